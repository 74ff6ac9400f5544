"""overhead: what each layer of the mesh adds, on the synthetic engine with no delay.

Layers, each at every concurrency level:
    engine   the synthetic engine called in this process (its own time: the baseline)
    mesh     MeshClient -> broker -> worker runtime -> back
    gateway  HTTP streaming /v1/completions through `mesh gateway openai` (the full stack),
             timed by a minimal HTTP client (bench.rawhttp) so the figure charges the stack
    gateway-aiohttp  the same through aiohttp's client, for comparison: what a typical
             Python client adds on its own side
    floor    the gateway layer's path with nothing of the stack on it (bench.floor: bare
             HTTP front, ZeroMQ relay and worker processes), at the first level only:
             what the machine charges for the hops themselves, in the same run

added_ttft_ms (the issue's figure) is the full stack's TTFT minus the engine's own,
per percentile, at concurrency 1; above_floor_ttft_ms is the full stack's TTFT minus
the floor's, the part of it that is the stack's own code.

--pin places the processes (`mesh ... --cpus`): broker and worker on one CPU,
gateway and the bench process on another. The OS scheduler otherwise spreads
threads over idle CPUs, and on a VM every cross-CPU wake-up is an interrupt
through the hypervisor (see bench/README.md).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from bench.floor import start_floor
from bench.load import (
    PROMPT,
    HttpTarget,
    LoadSummary,
    Timing,
    http_requester,
    http_session,
    mesh_requester,
    run_closed_loop,
    summarize,
)
from bench.mesh_stack import SYNTHETIC_MODEL, Placement, start_synthetic_mesh
from bench.processes import ProcessGroup
from bench.profile import Profiler
from bench.rawhttp import RawHttpPool, raw_http_requester
from bench.report import SuiteResult, Target, load_table, plot_load
from mesh.cli_options import cpu_list
from mesh.client import MeshClient
from mesh.engines.base import EngineConfig
from mesh.engines.synthetic import SyntheticEngine
from mesh.protocol import GenerateRequest
from mesh.reply_stream import DEFAULT_STREAM_INTERVAL

ADDED_P50_TARGET_MS = 1.0
ADDED_P99_TARGET_MS = 3.0
PROFILE_SECONDS = 8


def engine_requester(engine: SyntheticEngine, max_tokens: int):  # type: ignore[no-untyped-def]
    request = GenerateRequest(model=SYNTHETIC_MODEL, prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True)

    async def one(timing: Timing) -> None:
        async for output in engine.generate(request, "bench"):
            if output.text or output.token_ids:
                timing.arrivals.append(time.perf_counter())
            if output.finish_reason is not None:
                timing.output_tokens = output.completion_tokens

    return one


async def _sweep(name: str, make, levels: list[int], requests: int, max_seconds: float, bar) -> list[LoadSummary]:  # type: ignore[no-untyped-def]
    summaries = []
    warm_timings, _ = await run_closed_loop(make(), 1, 5, max_seconds)  # warm caches, connections, imports
    del warm_timings
    for level in levels:
        bar.set_postfix_str(f"{name} c={level}")
        timings, seconds = await run_closed_loop(make(), level, max(requests, level), max_seconds, bar.update)
        summaries.append(summarize(level, timings, seconds))
    return summaries


async def _floor(out: Path, level: int, requests: int, max_tokens: int, max_seconds: float, bar) -> list[LoadSummary]:  # type: ignore[no-untyped-def]
    """The gateway layer's path on bare processes (bench.floor), timed by the same client."""
    with ProcessGroup(out / "logs" / "overhead-floor") as group:
        url = await start_floor(group, max_tokens)
        pool = RawHttpPool(url)
        try:
            target = HttpTarget(url, SYNTHETIC_MODEL)
            return await _sweep(
                "floor", lambda: raw_http_requester(pool, target, max_tokens), [level], requests, max_seconds, bar
            )
        finally:
            await pool.close()


def _added(layer: LoadSummary, base: LoadSummary) -> dict[str, float]:
    return {"p50": layer.ttft_ms.p50 - base.ttft_ms.p50, "p99": layer.ttft_ms.p99 - base.ttft_ms.p99}


async def run(
    out: Path,
    *,
    levels: list[int],
    requests: int,
    max_tokens: int,
    gateway: bool,
    max_seconds: float,
    progress: bool = True,
    profile: bool = False,
    pin: bool = False,
    stream_interval_ms: float | None = None,
) -> SuiteResult:
    placement = Placement.split() if pin else None
    worker_args = () if stream_interval_ms is None else ("--stream-interval-ms", str(stream_interval_ms))
    params = {
        "concurrency": levels,
        "requests_per_level": requests,
        "max_tokens": max_tokens,
        "engine": "synthetic, no delay (fake tokens)",
        "stream_interval_ms": DEFAULT_STREAM_INTERVAL * 1000 if stream_interval_ms is None else stream_interval_ms,
        "max_seconds_per_level": max_seconds,
        "placement": dataclasses.asdict(placement) if placement else "the OS scheduler's",
    }
    affinity = os.sched_getaffinity(0)
    if placement is not None:  # this process, and the threads it starts from now on
        os.sched_setaffinity(0, cpu_list(placement.client))
    try:
        return await _run(
            out, params, levels, requests, max_tokens, gateway, max_seconds, progress, profile, placement, worker_args
        )
    finally:
        os.sched_setaffinity(0, affinity)


async def _run(
    out: Path,
    params: dict[str, object],
    levels: list[int],
    requests: int,
    max_tokens: int,
    gateway: bool,
    max_seconds: float,
    progress: bool,
    profile: bool,
    placement: Placement | None,
    worker_args: tuple[str, ...],
) -> SuiteResult:
    from tqdm import tqdm

    layers: dict[str, list[LoadSummary]] = {}
    profiler = Profiler(out)
    skipped: dict[str, str] = {}
    total = sum(max(requests, c) for c in levels) * (4 if gateway else 2) + (max(requests, levels[0]) if gateway else 0)
    bar = tqdm(total=total, desc="overhead", disable=not progress, unit="req")
    try:
        engine = SyntheticEngine(EngineConfig(backend="synthetic", model_names=(SYNTHETIC_MODEL,)))
        await engine.start()
        layers["engine"] = await _sweep(
            "engine", lambda: engine_requester(engine, max_tokens), levels, requests, max_seconds, bar
        )
        mesh = await start_synthetic_mesh(
            out / "logs" / "overhead",
            capacity=max(levels),
            gateway=gateway,
            placement=placement,
            worker_args=worker_args,
        )
        with mesh.group:
            async with MeshClient(mesh.broker_url) as client:
                await client.wait_for_models([SYNTHETIC_MODEL])
                layers["mesh"] = await _sweep(
                    "mesh",
                    lambda: mesh_requester(client, SYNTHETIC_MODEL, max_tokens),
                    levels,
                    requests,
                    max_seconds,
                    bar,
                )
            if mesh.gateway_url is not None:
                target = HttpTarget(mesh.gateway_url, SYNTHETIC_MODEL)
                if profile:  # the full stack under load: every process on the path
                    for process in mesh.group.processes:
                        profiler.start(f"overhead-{process.name}", process.pid, PROFILE_SECONDS)
                    profiler.start("overhead-client", os.getpid(), PROFILE_SECONDS)
                pool = RawHttpPool(mesh.gateway_url)
                try:
                    layers["gateway"] = await _sweep(
                        "gateway",
                        lambda: raw_http_requester(pool, target, max_tokens),
                        levels,
                        requests,
                        max_seconds,
                        bar,
                    )
                finally:
                    await pool.close()
                layers["floor"] = await _floor(out, levels[0], requests, max_tokens, max_seconds, bar)
                async with http_session(max(levels)) as session:
                    layers["gateway-aiohttp"] = await _sweep(
                        "gateway-aiohttp",
                        lambda: http_requester(session, target, max_tokens),
                        levels,
                        requests,
                        max_seconds,
                        bar,
                    )
            elif gateway:
                skipped["gateway"] = mesh.gateway_skipped or "not started"
            else:
                skipped["gateway"] = "--no-gateway"
    finally:
        bar.close()
    profiles = profiler.finish() if profile else {}

    base = layers["engine"][0]
    full_layer = "gateway" if "gateway" in layers else "mesh"
    added = _added(layers[full_layer][0], base)
    summary: dict[str, object] = {
        "added_ttft_ms": {**added, "layer": full_layer, "concurrency": levels[0]},
        "added_ttft_ms_by_layer": {
            name: {str(s.concurrency): _added(s, b) for s, b in zip(series, layers["engine"], strict=True)}
            for name, series in layers.items()
            if name not in ("engine", "floor")
        },
    }
    if "floor" in layers:
        floor, full = layers["floor"][0], layers[full_layer][0]
        summary["floor_ttft_ms"] = {"p50": floor.ttft_ms.p50, "p99": floor.ttft_ms.p99, "concurrency": levels[0]}
        summary["above_floor_ttft_ms"] = {
            "p50": full.ttft_ms.p50 - floor.ttft_ms.p50,
            "p99": full.ttft_ms.p99 - floor.ttft_ms.p99,
        }
    if skipped:
        summary["skipped_layers"] = skipped
    if profiles:
        summary["profiles"] = profiles
    targets = [
        Target(
            f"added TTFT p50, {full_layer} (ms)",
            f"<= {ADDED_P50_TARGET_MS}",
            added["p50"],
            added["p50"] <= ADDED_P50_TARGET_MS,
        ),
        Target(
            f"added TTFT p99, {full_layer} (ms)",
            f"<= {ADDED_P99_TARGET_MS}",
            added["p99"],
            added["p99"] <= ADDED_P99_TARGET_MS,
        ),
    ]
    plot_load(out, "overhead", "overhead (synthetic engine, no delay)", layers)
    (out / "overhead.md").write_text(load_table([(n, s) for n, series in layers.items() for s in series]) + "\n")
    return SuiteResult("overhead", params=params, results=layers, summary=summary, targets=targets)
