"""One MeshClient for the whole UI process, created on the event loop that Gradio runs async handlers on.

Gradio serves from its own thread and loop; a zmq.asyncio socket belongs to the
loop it was made on, so the client is started lazily from the first handler
and every later handler (same loop) shares it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from mesh.client import MeshClient
from mesh.security import SecurityConfig

log = logging.getLogger("gateways.gradio")


class MeshLink:
    def __init__(self, broker_url: str, security: SecurityConfig, timeout: float | None) -> None:
        self._broker_url = broker_url
        self._security = security
        self._timeout = timeout
        self._client: MeshClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[MeshClient] | None = None

    async def client(self) -> MeshClient:
        loop = asyncio.get_running_loop()
        if self._starting is None:
            self._loop = loop
            self._starting = loop.create_task(self._start(), name="gradio-mesh-client")
        elif loop is not self._loop:
            raise RuntimeError("the mesh client is used from a second event loop")
        return await asyncio.shield(self._starting)

    async def _start(self) -> MeshClient:
        client = MeshClient(self._broker_url, security=self._security, timeout=self._timeout)
        await client.start()
        self._client = client
        return client

    def close_from_other_thread(self, timeout: float = 5.0) -> None:
        """Closes the client on its own loop (called from the main thread at shutdown)."""
        if self._loop is None or self._starting is None or self._loop.is_closed():
            return

        async def close() -> None:
            assert self._starting is not None
            client = await self._starting
            await client.close()

        future = asyncio.run_coroutine_threadsafe(close(), self._loop)
        try:
            future.result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError, OSError) as exc:
            log.warning("the mesh client did not close cleanly: %s", exc)
