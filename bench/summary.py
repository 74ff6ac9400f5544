"""all: every suite with parameters that fit in under 10 minutes on a 2-core machine, then summary.md."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.report import SuiteResult, machine_info, markdown_table, targets_table, write_json

#: (suite, argv) in running order: the cheap, exact suites first.
PLAN: list[tuple[str, list[str]]] = [
    ("relay", ["--frames", "200000"]),
    ("roundtrip", ["--requests", "2000"]),
    ("overhead", ["--requests", "200", "--max-tokens", "32", "--max-seconds", "20"]),
    # The scaling ratio needs several requests per stream: with one, a single lucky or unlucky
    # single-stream request moves it by 10%. These are `serve`'s own defaults (about 100 s).
    (
        "serve",
        ["--backend", "transformers", "--concurrency", "1,4,16", "--requests-per-stream", "4", "--max-seconds", "60"],
    ),
    (
        "compare",
        [
            "--with-vllm-server",
            "--concurrency",
            "1,4,16",
            "--requests-per-stream",
            "1",
            "--rounds",
            "2",
            "--max-seconds",
            "30",
        ],
    ),
]


async def run_all(args: argparse.Namespace) -> SuiteResult:
    from bench.cli import build_parser, print_result, run_suite

    started = time.monotonic()
    parser = build_parser()
    results: list[SuiteResult] = []
    for suite, argv in PLAN:
        if suite in args.skip:
            continue
        extra = ["--out", str(args.out)] + (["--no-progress"] if args.no_progress else [])
        if args.quick or args.smoke:
            extra.append("--smoke" if args.smoke else "--quick")
        suite_args = parser.parse_args([suite, *argv, *extra])
        result = await run_suite(suite, suite_args)
        print_result(result, write_json(args.out, result))
        results.append(result)
    path = write_summary(args.out, results, time.monotonic() - started)
    return SuiteResult(
        "all",
        params={"suites": [r.suite for r in results], "summary": str(path)},
        summary={r.suite: r.status if r.status == "ok" else f"skipped: {r.skipped}" for r in results},
        targets=[t for r in results for t in r.targets],
    )


def write_summary(out: Path, results: list[SuiteResult], seconds: float) -> Path:
    machine = machine_info()
    lines = [
        "# llm-mesh benchmark summary",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"load average {machine['load_avg_1m']} at the end; total {seconds:.0f} s.",
        "",
        "## Targets",
        "",
        targets_table([t for r in results for t in r.targets]),
        "",
        "## Suites",
        "",
        markdown_table(
            ("suite", "status", "seconds", "summary"),
            [
                [r.suite, r.status if r.status == "ok" else f"skipped: {r.skipped}", r.duration_s, _short(r)]
                for r in results
            ],
        ),
        "",
    ]
    for r in results:
        table = out / f"{r.suite}.md"
        if r.status == "ok" and table.exists():
            lines += [f"## {r.suite}", "", table.read_text().strip(), ""]
            lines += [f"![{png.stem}]({png.name})" for png in sorted(out.glob(f"{r.suite}*.png"))] + [""]
    relay_png = out / "relay.png"
    if relay_png.exists():
        lines += ["## relay", "", f"![relay]({relay_png.name})", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _short(result: SuiteResult) -> str:
    text = ", ".join(
        f"{k}: {_fmt(v)}"
        for k, v in result.summary.items()
        if not isinstance(v, dict) or k in ("added_ttft_ms", "roundtrip_ms", "output_tokens_per_s")
    )
    return text.replace("|", "/")[:300]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)
