"""serve: a real model through the OpenAI gateway at a sweep of concurrency, as `vllm bench serve` reports it.

Closed loop: at each level, that many streams each send `requests_per_stream`
streaming /v1/completions requests of `max_tokens` tokens (ignore_eos, so
every request has the same length), one after another. Reports TTFT, TPOT,
ITL and E2E (p50, p90, p99), requests/s and output tokens/s per level.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.load import (
    HttpTarget,
    LoadSummary,
    discover_target,
    http_requester,
    http_session,
    run_closed_loop,
    summarize,
)
from bench.mesh_stack import VLLM_WORKER_ARGS, start_model_mesh
from bench.processes import ProcessGroup
from bench.report import SuiteResult, Target, load_table, plot_load

#: Issue 3: the transformers backend at 16 streams reaches 6x its single-stream tokens/s.
SCALING_TARGET = 6.0
WARMUP_REQUESTS = 2


def suite_name(backend: str, target: str | None) -> str:
    return "serve_target" if target else f"serve_{backend}"


async def sweep(
    target: HttpTarget,
    levels: list[int],
    requests_per_stream: int,
    max_tokens: int,
    max_seconds: float,
    progress: Callable[[int], object] | None = None,
) -> list[LoadSummary]:
    summaries = []
    async with http_session(max(levels)) as session:
        await run_closed_loop(http_requester(session, target, max_tokens), 1, WARMUP_REQUESTS, max_seconds)
        for level in levels:
            timings, seconds = await run_closed_loop(
                http_requester(session, target, max_tokens), level, level * requests_per_stream, max_seconds, progress
            )
            summaries.append(summarize(level, timings, seconds))
    return summaries


def scaling_target(label: str, summaries: list[LoadSummary], low: int = 1, high: int = 16) -> Target | None:
    by_level = {s.concurrency: s for s in summaries}
    if low not in by_level or high not in by_level or by_level[low].output_tokens_per_s <= 0:
        return None
    ratio = by_level[high].output_tokens_per_s / by_level[low].output_tokens_per_s
    return Target(
        f"{label}: tok/s at {high} streams / at {low}", f">= {SCALING_TARGET}x", ratio, ratio >= SCALING_TARGET
    )


async def run(
    out: Path,
    *,
    backend: str,
    target: str | None,
    model: str | None,
    levels: list[int],
    requests_per_stream: int,
    max_tokens: int,
    max_seconds: float,
    progress: bool = True,
) -> SuiteResult:
    from tqdm import tqdm

    name = suite_name(backend, target)
    params = {
        "backend": None if target else backend,
        "target": target,
        "concurrency": levels,
        "requests_per_stream": requests_per_stream,
        "max_tokens": max_tokens,
        "max_seconds_per_level": max_seconds,
        "endpoint": "/v1/completions, streaming, temperature 0",
    }
    with ProcessGroup(out / "logs" / name) as group:
        base_url = target or await start_model_mesh(group, backend, VLLM_WORKER_ARGS if backend == "vllm" else ())
        http = await discover_target(base_url, model)
        params.update(model=http.model, ignore_eos=http.ignore_eos)
        with tqdm(total=sum(levels) * requests_per_stream, desc=name, disable=not progress, unit="req") as bar:
            summaries = await sweep(http, levels, requests_per_stream, max_tokens, max_seconds, bar.update)
    targets = []
    if not target and backend == "transformers" and (t := scaling_target("transformers", summaries)) is not None:
        targets.append(t)
    label = target or f"mesh+{backend}"
    plot_load(out, name, f"serve: {label} ({http.model})", {label: summaries})
    (out / f"{name}.md").write_text(load_table([(label, s) for s in summaries]) + "\n")
    summary = {
        "output_tokens_per_s": {str(s.concurrency): s.output_tokens_per_s for s in summaries},
        "ttft_ms_p50": {str(s.concurrency): s.ttft_ms.p50 for s in summaries},
    }
    return SuiteResult(name, params=params, results=summaries, summary=summary, targets=targets)
