"""Closed-loop load: N concurrent streams, each timing its tokens, through the mesh client or OpenAI HTTP.

Every request records when it started, when each delta arrived and how many
tokens it produced; summarize() turns those into TTFT / TPOT / ITL / E2E
distributions and throughput, the way `vllm bench serve` reports them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec

from bench.stats import Dist, ms
from mesh.client import MeshClient
from mesh.protocol import GenerateRequest

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(slots=True)
class Timing:
    """One request, timed from its submission (perf_counter seconds)."""

    start: float
    arrivals: list[float] = field(default_factory=list)
    output_tokens: int = 0
    end: float = 0.0
    error: str | None = None
    #: Still running when the level's time bound cut it off.
    cut: bool = False

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def tpot(self) -> float | None:
        if self.output_tokens < 2 or not self.arrivals:
            return None
        return (self.end - self.arrivals[0]) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class LoadSummary:
    concurrency: int
    requests: int
    errors: int
    cut: int
    duration_s: float
    request_per_s: float
    output_tokens_per_s: float
    ttft_ms: Dist
    tpot_ms: Dist
    itl_ms: Dist
    e2e_ms: Dist
    first_error: str | None = None


def summarize(concurrency: int, timings: list[Timing], duration_s: float) -> LoadSummary:
    good = [t for t in timings if t.error is None and t.arrivals and not t.cut]
    errors = [t for t in timings if t.error is not None or (not t.arrivals and not t.cut)]
    cut = [t for t in timings if t.cut and t.error is None]
    # A cut request's deltas count towards throughput (a lower bound when a server coalesces tokens).
    tokens = sum(t.output_tokens for t in good) + sum(len(t.arrivals) for t in cut)
    return LoadSummary(
        concurrency=concurrency,
        requests=len(good),
        errors=len(errors),
        cut=len(cut),
        duration_s=round(duration_s, 3),
        request_per_s=len(good) / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=tokens / duration_s if duration_s > 0 else 0.0,
        ttft_ms=Dist.of([ms(t.ttft) for t in good]),
        tpot_ms=Dist.of([ms(x) for t in good if (x := t.tpot()) is not None]),
        itl_ms=Dist.of([ms(x) for t in good for x in t.itls()]),
        e2e_ms=Dist.of([ms(t.e2e) for t in good]),
        first_error=next((t.error for t in errors if t.error), None),
    )


async def run_closed_loop(
    one_request: Callable[[Timing], Awaitable[None]],
    concurrency: int,
    requests: int,
    max_seconds: float,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[Timing], float]:
    """`concurrency` streams issue up to `requests` requests in all.

    No request starts after `max_seconds`; requests still running at
    1.5 x max_seconds are cut off (counted in `cut`, their tokens still count
    towards throughput), so a level never runs much past its bound.
    """
    timings: list[Timing] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def stream() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            timing = Timing(time.perf_counter())
            timings.append(timing)
            await one_request(timing)
            timing.end = time.perf_counter()
            if progress is not None:
                progress(1)

    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + max_seconds * 1.5):
            await asyncio.gather(*(stream() for _ in range(concurrency)))
    except TimeoutError:
        now = time.perf_counter()
        for timing in timings:
            if timing.end == 0.0:
                timing.end, timing.cut = now, True
    return timings, time.perf_counter() - started


# ---------------------------------------------------------------------- mesh client


def mesh_requester(client: MeshClient, model: str, max_tokens: int, ignore_eos: bool = True):  # type: ignore[no-untyped-def]
    request = GenerateRequest(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)

    async def one(timing: Timing) -> None:
        try:
            async for chunk in client.generate(request, timeout=120):
                now = time.perf_counter()
                if chunk.token_ids or chunk.text:
                    timing.arrivals.append(now)
                if chunk.usage is not None:
                    timing.output_tokens = chunk.usage.completion_tokens
        except Exception as exc:
            timing.error = f"{type(exc).__name__}: {exc}"

    return one


# ---------------------------------------------------------------------- OpenAI HTTP


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Choice(msgspec.Struct):
    text: str | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


event_decoder = msgspec.json.Decoder(_Event)


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """An OpenAI-compatible endpoint: base URL ending in /v1, and the model name to ask for."""

    base_url: str
    model: str
    ignore_eos: bool = True
    api_key: str = "bench"


def completion_body(target: HttpTarget, max_tokens: int) -> dict[str, object]:
    body: dict[str, object] = {
        "model": target.model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension, also the gateway's: equal lengths for every request
    return body


def http_requester(session: aiohttp.ClientSession, target: HttpTarget, max_tokens: int):  # type: ignore[no-untyped-def]
    url = f"{target.base_url}/completions"
    payload = msgspec.json.encode(completion_body(target, max_tokens))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {target.api_key}"}

    async def one(timing: Timing) -> None:
        try:
            async with session.post(url, data=payload, headers=headers) as response:
                if response.status != 200:
                    text = await response.text()
                    raise RuntimeError(f"HTTP {response.status}: {text[:200]}")
                deltas = 0
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    now = time.perf_counter()
                    event = event_decoder.decode(data)
                    if any(c.text for c in event.choices):
                        timing.arrivals.append(now)
                        deltas += 1
                    if event.usage is not None:
                        timing.output_tokens = event.usage.completion_tokens
                # Without usage, count deltas (a lower bound when a server coalesces).
                timing.output_tokens = timing.output_tokens or deltas
        except Exception as exc:
            timing.error = f"{type(exc).__name__}: {exc}"

    return one


async def one_timed(requester: Callable[[Timing], Awaitable[None]]) -> Timing:
    timing = Timing(time.perf_counter())
    await requester(timing)
    timing.end = time.perf_counter()
    return timing


def http_session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max(concurrency, 1) + 4, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


async def discover_target(base_url: str, model: str | None = None, api_key: str = "bench") -> HttpTarget:
    """Finds the model to ask for (the first one listed unless given) and whether ignore_eos is accepted."""
    headers = {"Authorization": f"Bearer {api_key}"}
    async with http_session(1) as session:
        if model is None:
            async with session.get(f"{base_url}/models", headers=headers) as response:
                response.raise_for_status()
                listing = await response.json()
            models = [m["id"] for m in listing.get("data", [])]
            if not models:
                raise RuntimeError(f"{base_url}/models lists no model")
            model = models[0]
        target = HttpTarget(base_url, model, True, api_key)
        timing = await one_timed(http_requester(session, target, 2))
        if timing.error is not None and "400" in timing.error:
            target = HttpTarget(base_url, model, False, api_key)  # a server without the ignore_eos extension
            timing = await one_timed(http_requester(session, target, 2))
        if timing.error is not None:
            raise RuntimeError(f"{base_url}: a probe request failed: {timing.error}")
    return target
