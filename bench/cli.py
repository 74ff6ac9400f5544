"""The bench command line: one sub-command per suite, each writing DIR/<suite>.json."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bench.report import SuiteResult, skipped, targets_table, write_json
from mesh.cli_options import add_cpu_latency_option
from mesh.cpu_latency import CpuLatencyError, hold_cpu_latency
from mesh.reply_stream import DEFAULT_STREAM_INTERVAL

DEFAULT_OUT = Path("bench-results")
Runner = Callable[[argparse.Namespace], Awaitable[SuiteResult]]


def _concurrency_list(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def _common(p: argparse.ArgumentParser, profiled: bool = False) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where JSON, tables, plots and process logs go (default: {DEFAULT_OUT})",
    )
    p.add_argument("--quick", action="store_true", help="a reduced run for a smoke check (under a minute)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny counts, for CI
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_cpu_latency_option(p)
    if profiled:
        p.add_argument(
            "--profile",
            action="store_true",
            help="sample the mesh processes with py-spy; OUT/profile-*.txt says where the time goes",
        )


# ---------------------------------------------------------------------- suites


async def _relay(args: argparse.Namespace) -> SuiteResult:
    from bench import relay

    frames = 2_000 if args.smoke else 50_000 if args.quick else args.frames
    return await relay.run(
        args.out,
        frames=frames,
        streams=args.streams,
        coalesce=args.coalesce,
        max_seconds=args.max_seconds,
        progress=not args.no_progress,
        profile=args.profile,
    )


async def _roundtrip(args: argparse.Namespace) -> SuiteResult:
    from bench import roundtrip

    requests = 100 if args.smoke else 1000 if args.quick else args.requests
    return await roundtrip.run(args.out, requests=requests, progress=not args.no_progress, profile=args.profile)


async def _overhead(args: argparse.Namespace) -> SuiteResult:
    from bench import overhead

    if args.smoke:
        levels, requests, tokens = [1, 8], 16, 8
    elif args.quick:
        levels, requests, tokens = [1, 8, 32, 64], 64, 16
    else:
        levels, requests, tokens = args.concurrency, args.requests, args.max_tokens
    return await overhead.run(
        args.out,
        levels=levels,
        requests=requests,
        max_tokens=tokens,
        gateway=not args.no_gateway,
        max_seconds=args.max_seconds,
        progress=not args.no_progress,
        profile=args.profile,
        pin=args.pin,
        stream_interval_ms=args.stream_interval_ms,
    )


async def _timeline(args: argparse.Namespace) -> SuiteResult:
    from bench import timeline

    requests = 50 if args.smoke else 500 if args.quick else args.requests
    return await timeline.run(args.out, requests=requests, max_tokens=args.max_tokens, progress=not args.no_progress)


def _serve_sizes(args: argparse.Namespace) -> tuple[list[int], int, float]:
    if args.smoke:
        return [1, 2], 1, 10.0
    if args.quick:
        return [1, 4], 2, 20.0
    return args.concurrency, args.requests_per_stream, args.max_seconds


async def _serve(args: argparse.Namespace) -> SuiteResult:
    from bench import serve

    levels, per_stream, max_seconds = _serve_sizes(args)
    return await serve.run(
        args.out,
        backend=args.backend,
        target=args.target,
        model=args.model,
        levels=levels,
        requests_per_stream=per_stream,
        max_tokens=args.max_tokens,
        max_seconds=max_seconds,
        progress=not args.no_progress,
    )


async def _compare(args: argparse.Namespace) -> SuiteResult:
    from bench import compare

    levels, per_stream, max_seconds = _serve_sizes(args)
    return await compare.run(
        args.out,
        targets=args.target or [],
        with_vllm_server=args.with_vllm_server,
        levels=levels,
        requests_per_stream=per_stream,
        max_tokens=args.max_tokens,
        max_seconds=max_seconds,
        rounds=args.rounds,
        progress=not args.no_progress,
    )


async def _all(args: argparse.Namespace) -> SuiteResult:
    from bench import summary

    return await summary.run_all(args)


SUITES: dict[str, Runner] = {
    "relay": _relay,
    "roundtrip": _roundtrip,
    "overhead": _overhead,
    "timeline": _timeline,
    "serve": _serve,
    "compare": _compare,
    "all": _all,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="llm-mesh benchmarks. Every suite starts its own processes on free loopback ports, "
        "writes OUT/<suite>.json and stops everything it started.",
    )
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")

    p = sub.add_parser("relay", help="token frames/s through one broker (fake worker and client around it)")
    _common(p, profiled=True)
    p.add_argument("--frames", type=int, default=300_000, help="frames per run (default: 300000)")
    p.add_argument("--streams", type=int, default=16, help="concurrent requests the frames belong to (default: 16)")
    p.add_argument(
        "--coalesce",
        type=_concurrency_list,
        default=[4, 16],
        metavar="N,M",
        help="tokens per frame for the coalesced runs (default: 4,16)",
    )
    p.add_argument("--max-seconds", type=float, default=20.0, help="cap per run (default: 20)")

    p = sub.add_parser("roundtrip", help="one-token round trip: MeshClient -> broker -> worker -> back (p50, p99)")
    _common(p, profiled=True)
    p.add_argument("--requests", type=int, default=5000, help="sequential requests (default: 5000)")

    p = sub.add_parser("overhead", help="TTFT/ITL/E2E per layer on the synthetic engine with no delay")
    _common(p, profiled=True)
    p.add_argument("--concurrency", type=_concurrency_list, default=[1, 8, 32, 64], metavar="1,8,...")
    p.add_argument("--requests", type=int, default=400, help="requests per level and layer (default: 400)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap per level and layer (default: 30)")
    p.add_argument("--no-gateway", action="store_true", help="skip the HTTP gateway layer")
    p.add_argument(
        "--pin",
        action="store_true",
        help="broker and worker on one CPU, gateway and the bench client on another (--cpus)",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        metavar="MS",
        help=f"the worker's --stream-interval-ms (default: the worker's own, {DEFAULT_STREAM_INTERVAL * 1000:g}); "
        "0 sends every token as a frame",
    )

    p = sub.add_parser("timeline", help="one request's time to first token, event by event in every process")
    _common(p)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests (default: 2000)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")

    for name, text in (
        ("serve", "a real model through the OpenAI gateway at a sweep of concurrency"),
        ("compare", "the serve workload against several OpenAI endpoints, alternating"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--concurrency", type=_concurrency_list, default=[1, 4, 16], metavar="1,4,16")
        p.add_argument(
            "--requests-per-stream", type=int, default=4, help="requests each stream sends per level (default: 4)"
        )
        p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default: 64)")
        p.add_argument("--max-seconds", type=float, default=120.0, help="cap per level (default: 120)")
        if name == "serve":
            p.add_argument(
                "--backend",
                choices=["transformers", "vllm"],
                default="transformers",
                help="backend of the mesh the bench starts (default: transformers)",
            )
            p.add_argument("--target", metavar="URL", help="an existing OpenAI endpoint (…/v1) instead")
            p.add_argument("--model", help="model name to ask for (default: the first one listed)")
        else:
            p.add_argument(
                "--target", action="append", metavar="[LABEL=]URL", help="an OpenAI endpoint (…/v1); repeat for each"
            )
            p.add_argument(
                "--with-vllm-server",
                action="store_true",
                help="start vLLM's own server and a mesh with --backend vllm on the default model",
            )
            p.add_argument("--rounds", type=int, default=2, help="alternations between targets (default: 2)")

    p = sub.add_parser("all", help="every suite, then summary.md and plots (about 5 minutes)")
    _common(p)
    p.add_argument(
        "--skip", type=lambda v: [s for s in v.split(",") if s], default=[], metavar="S1,S2", help="suites to leave out"
    )
    return parser


def print_result(result: SuiteResult, path: Path) -> None:
    if result.status != "ok":
        print(f"{result.suite}: skipped: {result.skipped}")
    else:
        print(f"{result.suite}: {result.summary}")
        if result.targets:
            print(targets_table(result.targets))
    print(f"-> {path}")


def result_name(name: str, args: argparse.Namespace) -> str:
    """The JSON file a suite writes (serve writes one per backend)."""
    if name == "serve":
        from bench.serve import suite_name

        return suite_name(args.backend, args.target)
    return name


async def run_suite(name: str, args: argparse.Namespace) -> SuiteResult:
    """Runs one suite; anything that stops it becomes a 'skipped: reason' record, never a crash."""
    started = time.monotonic()
    try:
        result = await SUITES[name](args)
    except Exception as exc:
        logging.getLogger("bench").debug("suite %s failed", name, exc_info=True)
        detail = "".join(traceback.format_exception_only(exc)).strip()
        result = skipped(result_name(name, args), detail)
    result.duration_s = round(time.monotonic() - started, 1)
    return result


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so every process the suite started is stopped.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import uvloop

    try:
        # System-wide, so the bench process's own request covers every process a suite starts.
        with hold_cpu_latency(args.cpu_latency_us), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run_suite(args.suite, args))
    except CpuLatencyError as exc:
        print(f"{args.suite}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.suite}: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    path = write_json(args.out, result)
    print_result(result, path)
    sys.stdout.flush()
    return 0 if result.status == "ok" or args.suite == "all" else 2
