"""What CURVE costs: one-token round trip (p50/p99) and relay throughput, plain vs CURVE.

    python -m bench.curve [--requests 1000] [--streams 8] [--tokens 2000] [--rounds 3] [--out DIR]

Each mode starts its own broker and one worker on loopback (the worker runs the SYNTHETIC
engine with no delay: fake tokens, so the figures are the mesh's own cost), then measures
  - latency: one-token requests, one at a time, MeshClient -> broker -> worker -> back;
  - throughput: --streams concurrent requests of --tokens tokens; every token is one frame
    relayed worker -> broker -> client, so tokens/s is relay frames/s.
CURVE mode runs with keys from `mesh keys init` in a temporary folder (ZAP allow-lists on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.processes import MESH_CLI, synthetic_worker_command
from mesh.client import MeshClient
from mesh.keys import broker_dir, init_keys, plan_nodes
from mesh.protocol import GenerateRequest
from mesh.security import SecurityConfig

MODEL = "synthetic"
WARMUP = 50


@dataclass(frozen=True, slots=True)
class ModeResult:
    mode: str
    p50_ms: float
    p99_ms: float
    frames_per_s: float


def _free_base_port() -> int:
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 4 < 65535 and all(_port_free(base + i) for i in range(4)):
            return base
    raise RuntimeError("no four consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def _mesh(url: str, keys: Path | None, logs: Path):  # type: ignore[no-untyped-def]
    """A broker and one synthetic worker (fake tokens), always stopped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    broker_keys = ["--keys", str(broker_dir(keys))] if keys else []
    worker_keys = ["--keys", str(keys / "workers" / "worker-1")] if keys else []
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    try:
        for name, argv in (
            ("broker", [*MESH_CLI, "broker", "--broker", url, *broker_keys]),
            (
                "worker",
                synthetic_worker_command(url, MODEL, "--capacity", "64", "--log-level", "WARNING", *worker_keys),
            ),
        ):
            with (logs / f"{name}.log").open("wb") as log:
                children.append(
                    subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
        yield
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


async def _measure(
    url: str, security: SecurityConfig, requests: int, streams: int, tokens: int
) -> tuple[list[float], float]:
    async with MeshClient(url, security=security, connect_timeout=30) as client:
        await client.wait_for_broker(30)
        await client.wait_for_models([MODEL], timeout=30)
        ping = GenerateRequest(model=MODEL, prompt="ping", max_tokens=1)
        samples: list[float] = []
        for i in range(WARMUP + requests):
            start = time.perf_counter()
            async for _ in client.generate(ping, timeout=30):
                pass
            if i >= WARMUP:
                samples.append((time.perf_counter() - start) * 1000)

        async def stream(seed: int) -> int:
            count = 0
            request = GenerateRequest(model=MODEL, prompt="relay", max_tokens=tokens, seed=seed)
            async for chunk in client.generate(request, timeout=60):
                count += len(chunk.token_ids)
            return count

        start = time.perf_counter()
        relayed = sum(await asyncio.gather(*(stream(i) for i in range(streams))))
        return samples, relayed / (time.perf_counter() - start)


def _percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def run(requests: int, streams: int, tokens: int, rounds: int, logs: Path) -> list[ModeResult]:
    """Alternates plain and CURVE `rounds` times (a busy machine drifts) and keeps each figure's median."""
    by_mode: dict[str, list[ModeResult]] = {"plain": [], "curve": []}
    with tempfile.TemporaryDirectory(prefix="mesh-curve-") as tmp:
        keys = Path(tmp) / "keys"
        init_keys(keys, plan_nodes(1, 1, [], []))
        for round_ in range(rounds):
            for mode, mode_keys in (("plain", None), ("curve", keys)):
                url = f"tcp://127.0.0.1:{_free_base_port()}"
                security = SecurityConfig(keys_dir=keys / "clients" / "client-1") if mode_keys else SecurityConfig()
                with _mesh(url, mode_keys, logs / f"{mode}-{round_}"):
                    samples, fps = asyncio.run(_measure(url, security, requests, streams, tokens))
                by_mode[mode].append(ModeResult(mode, statistics.median(samples), _percentile(samples, 99), fps))
    return [
        ModeResult(
            mode,
            round(statistics.median(r.p50_ms for r in runs), 3),
            round(statistics.median(r.p99_ms for r in runs), 3),
            round(statistics.median(r.frames_per_s for r in runs)),
        )
        for mode, runs in by_mode.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.curve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="one-token requests per mode (default: 1000)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams for throughput (default: 8)")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per stream (default: 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="plain/CURVE alternations; medians kept (default: 3)")
    parser.add_argument("--out", type=Path, help="write curve.json and the process logs here")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="mesh-curve-out-"))
    results = run(args.requests, args.streams, args.tokens, args.rounds, out / "logs")
    plain, curve = results
    print(f"{'mode':6s} {'p50 ms':>8s} {'p99 ms':>8s} {'frames/s':>10s}")
    for r in results:
        print(f"{r.mode:6s} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {r.frames_per_s:10.0f}")
    print(
        f"CURVE cost: p50 {curve.p50_ms - plain.p50_ms:+.3f} ms, p99 {curve.p99_ms - plain.p99_ms:+.3f} ms, "
        f"throughput {100 * (curve.frames_per_s / plain.frames_per_s - 1):+.1f}%"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
