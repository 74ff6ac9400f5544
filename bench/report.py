"""Suite results on disk: one JSON file per suite, Markdown tables, PNG plots."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.load import LoadSummary
from mesh.cpu_latency import idle_states


@dataclass(frozen=True, slots=True)
class Target:
    """A figure an issue asks for, and whether this run met it."""

    name: str
    goal: str
    measured: float | None
    met: bool | None


@dataclass(slots=True)
class SuiteResult:
    suite: str
    status: str = "ok"  # ok, or skipped (then `skipped` says why)
    skipped: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    results: Any = None
    summary: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=lambda: machine_info())
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    duration_s: float = 0.0


def skipped(suite: str, reason: str, params: dict[str, Any] | None = None) -> SuiteResult:
    return SuiteResult(suite, status="skipped", skipped=reason, params=params or {})


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_avg_1m": round(load[0], 2),
        "cpu_idle": idle_states(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _clean(value: Any) -> Any:
    # JSON has no NaN: an empty distribution becomes null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_plain(result: SuiteResult) -> dict[str, Any]:
    return _clean(msgspec.to_builtins(result))


def write_json(out: Path, result: SuiteResult) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.suite}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(to_plain(result)), indent=2) + b"\n")
    return path


# ---------------------------------------------------------------------- tables


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            if not math.isfinite(value):
                return "-"
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


LOAD_HEADERS = (
    "label",
    "conc",
    "req",
    "err/cut",
    "req/s",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "ITL p50",
    "ITL p99",
    "E2E p50",
    "E2E p99",
)


def load_rows(labelled: Sequence[tuple[str, LoadSummary]]) -> list[list[object]]:
    return [
        [
            label,
            s.concurrency,
            s.requests,
            f"{s.errors}/{s.cut}",
            s.request_per_s,
            s.output_tokens_per_s,
            s.ttft_ms.p50,
            s.ttft_ms.p99,
            s.tpot_ms.p50,
            s.itl_ms.p50,
            s.itl_ms.p99,
            s.e2e_ms.p50,
            s.e2e_ms.p99,
        ]
        for label, s in labelled
    ]


def load_table(labelled: Sequence[tuple[str, LoadSummary]]) -> str:
    return markdown_table(LOAD_HEADERS, load_rows(labelled)) + "\n\n(latencies in ms)"


def targets_table(targets: Sequence[Target]) -> str:
    rows = [[t.name, t.goal, t.measured, "yes" if t.met else "no" if t.met is not None else "n/a"] for t in targets]
    return markdown_table(("target", "goal", "measured", "met"), rows)


# ---------------------------------------------------------------------- plots


def plot_load(out: Path, name: str, title: str, series: dict[str, list[LoadSummary]]) -> list[Path]:
    """Two PNGs: latency percentiles against concurrency, and throughput against concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, summaries in series.items():
        xs = [s.concurrency for s in summaries]
        for ax, metric in zip(axes, ("ttft_ms", "itl_ms", "e2e_ms"), strict=True):
            for pct, style in (("p50", "-o"), ("p99", "--^")):
                ys = [getattr(getattr(s, metric), pct) for s in summaries]
                ax.plot(xs, ys, style, label=f"{label} {pct}")
    levels = sorted({s.concurrency for summaries in series.values() for s in summaries})
    titles = ("TTFT (ms)", "ITL (ms)", "E2E (ms)")
    paths.append(_finish(fig, axes, titles, levels, f"{title}: latency percentiles", out / f"{name}_latency.png", 7))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, summaries in series.items():
        xs = [s.concurrency for s in summaries]
        axes[0].plot(xs, [s.output_tokens_per_s for s in summaries], "-o", label=label)
        axes[1].plot(xs, [s.request_per_s for s in summaries], "-o", label=label)
    titles = ("output tokens/s", "requests/s")
    paths.append(_finish(fig, axes, titles, levels, f"{title}: throughput", out / f"{name}_throughput.png", 8))
    return paths


def _finish(fig, axes, titles: tuple[str, ...], levels: list[int], suptitle: str, path: Path, legend_size: int) -> Path:  # type: ignore[no-untyped-def]
    """Titles, concurrency x-axis, log y-axis (layers differ by orders of magnitude), legend; saves and closes."""
    import matplotlib.pyplot as plt

    for ax, axis_title in zip(axes, titles, strict=True):
        ax.set_title(axis_title)
        _concurrency_axis(ax, levels)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _concurrency_axis(ax, levels: list[int]) -> None:  # type: ignore[no-untyped-def]
    ax.set_xlabel("concurrent streams")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, labels=[str(level) for level in levels])
    ax.minorticks_off()


def plot_bars(out: Path, name: str, title: str, labels: Sequence[str], values: Sequence[float], unit: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(labels), list(values), color="tab:blue")
    ax.set_ylabel(unit)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
