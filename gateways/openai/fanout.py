"""One request's choices, run on the mesh at once and merged into one stream of (position, chunk)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mesh.client import Chunk, MeshClient
from mesh.protocol import GenerateRequest


async def generate_all(client: MeshClient, requests: list[GenerateRequest]) -> AsyncIterator[tuple[int, Chunk]]:
    """Yields (position in `requests`, chunk) as chunks arrive; raises the first failure.

    Closing this generator (or cancelling its consumer) cancels every request
    still running, down to the engine.
    """
    if len(requests) == 1:
        # The common case: no tasks, no queue, one hop less per token.
        async with contextlib.aclosing(client.generate(requests[0])) as stream:
            async for chunk in stream:
                yield 0, chunk
        return

    queue: asyncio.Queue[tuple[int, Chunk | BaseException]] = asyncio.Queue()

    async def pump(position: int, request: GenerateRequest) -> None:
        try:
            async with contextlib.aclosing(client.generate(request)) as stream:
                async for chunk in stream:
                    queue.put_nowait((position, chunk))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((position, exc))

    # Owned here: cancelled and awaited however the consumer leaves.
    tasks = [asyncio.create_task(pump(i, r), name=f"gateway-choice-{i}") for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                remaining -= 1
            yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
