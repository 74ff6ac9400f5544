"""Soak: mixed load for a long time with periodic worker kills; memory, descriptors, errors, p99.

    python -m bench.soak --minutes 30 --out DIR [--workers 3] [--concurrency 16] [--kill-every 30]

Starts a broker, --workers workers on the SYNTHETIC engine (fake tokens: this measures the mesh,
not a model) and the OpenAI gateway, all on loopback. Then, until the time is up:
  - --concurrency MeshClient loops send mixed requests: streams of 1..200 tokens, some abandoned
    early (cancel), some for an unknown model (must fail with model_not_found);
  - one loop sends chat completions through the gateway;
  - every --kill-every seconds one worker is killed with SIGKILL and started again;
  - every 5 s the RSS and open descriptors of the broker, gateway and workers are sampled.
Writes DIR/samples.csv, DIR/requests.csv, DIR/summary.json and DIR/soak.png, and prints the
summary. Targets: broker and gateway RSS growth <= 5% after warm-up, no descriptor growth, no
request lost without an error (every request ends with tokens or a typed error, none hangs).
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import MESH_CLI, free_broker_url, free_port, synthetic_worker_command
from mesh.client import MeshClient
from mesh.errors import MeshError, ModelNotFoundError
from mesh.protocol import GenerateRequest

MODEL = "synthetic"
SAMPLE_EVERY_S = 5.0
#: A request with no end after this long counts as lost (hung), the one outcome that must never happen.
HANG_AFTER_S = 60.0
MEMORY_GROWTH_TARGET = 0.05


@dataclass(slots=True)
class Child:
    role: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass(slots=True)
class Stats:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rows: list[tuple[float, str, str, float, int]] = field(default_factory=list)

    def record(self, started: float, kind: str, outcome: str, tokens: int) -> None:
        elapsed = (time.monotonic() - started) * 1000
        self.outcomes[outcome] += 1
        if outcome == "ok":
            self.latencies_ms.append(elapsed)
        self.rows.append((round(time.time(), 3), kind, outcome, round(elapsed, 2), tokens))


def _proc_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.url = free_broker_url()
        self.gateway_port = free_port()
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.broker = Child("broker", [*MESH_CLI, "broker", "--broker", self.url], logs / "broker.log")
        self.workers = [
            Child(
                f"worker-{i}",
                synthetic_worker_command(
                    self.url,
                    MODEL,
                    "--worker-id",
                    f"soak-{i}",
                    "--itl-ms",
                    str(args.itl_ms),
                    "--capacity",
                    "16",
                    "--log-level",
                    "WARNING",
                ),
                logs / f"worker-{i}.log",
            )
            for i in range(args.workers)
        ]
        self.gateway = (
            Child(
                "gateway",
                [
                    *MESH_CLI,
                    "gateway",
                    "openai",
                    "--broker",
                    self.url,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.gateway_port),
                    "--log-level",
                    "WARNING",
                ],
                logs / "gateway.log",
            )
            if args.gateway
            else None
        )
        self.stats = Stats()
        self.samples: list[dict[str, float]] = []
        self.kills = 0
        self.rng = random.Random(args.seed)

    @property
    def children(self) -> list[Child]:
        return [self.broker, *self.workers, *([self.gateway] if self.gateway else [])]

    async def run(self) -> dict[str, object]:
        for child in self.children:
            child.start(self.env)
        deadline = time.monotonic() + self.args.minutes * 60
        self.t0 = time.monotonic()
        try:
            async with MeshClient(self.url, connect_timeout=30) as client:
                await client.wait_for_broker(30)
                await client.wait_for_models([MODEL], timeout=60)
                if self.gateway:
                    await self._wait_for_gateway()
                loops = range(self.args.concurrency)
                tasks = [asyncio.create_task(self._client_loop(client, i, deadline)) for i in loops]
                tasks.append(asyncio.create_task(self._sampler(deadline)))
                tasks.append(asyncio.create_task(self._killer(deadline)))
                if self.gateway:
                    tasks.append(asyncio.create_task(self._gateway_loop(deadline)))
                await asyncio.gather(*tasks)
        finally:
            for child in reversed(self.children):
                child.stop()
        return self._summary()

    # ------------------------------------------------------------------ load

    async def _client_loop(self, client: MeshClient, index: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        while time.monotonic() < deadline:
            roll = rng.random()
            started = time.monotonic()
            if roll < 0.03:
                await self._one(
                    client,
                    GenerateRequest(model="no-such-model", prompt="x", max_tokens=2),
                    started,
                    "unknown_model",
                    expect=ModelNotFoundError,
                )
                continue
            request = GenerateRequest(
                model=MODEL,
                prompt=f"soak {index} {rng.random()}",
                max_tokens=rng.randint(1, 200),
                seed=rng.randrange(2**31),
            )
            abandon_after = rng.randint(1, 20) if roll < 0.13 else None
            kind = "cancel" if abandon_after else "stream"
            await self._one(client, request, started, kind, abandon_after=abandon_after)

    async def _one(
        self,
        client: MeshClient,
        request: GenerateRequest,
        started: float,
        kind: str,
        expect: type[MeshError] | None = None,
        abandon_after: int | None = None,
    ) -> None:
        tokens = 0
        try:
            async with asyncio.timeout(HANG_AFTER_S):
                stream = client.generate(request)
                try:
                    async for chunk in stream:
                        tokens += len(chunk.token_ids)
                        if abandon_after is not None and tokens >= abandon_after:
                            break
                finally:
                    await stream.aclose()
            outcome = "ok" if expect is None else "unexpected_ok"
            if abandon_after is not None:
                outcome = "cancelled_by_client"
            elif tokens != request.max_tokens:
                outcome = "short"
        except TimeoutError:
            outcome = "hung"
        except MeshError as exc:
            outcome = "expected_error" if expect is not None and isinstance(exc, expect) else exc.code
        self.stats.record(started, kind, outcome, tokens)

    async def _wait_for_gateway(self) -> None:
        import aiohttp

        url = f"http://127.0.0.1:{self.gateway_port}/v1/models"
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(url) as reply:
                        if reply.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the gateway never answered on {url}")

    async def _gateway_loop(self, deadline: float) -> None:
        import aiohttp

        url = f"http://127.0.0.1:{self.gateway_port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                started = time.monotonic()
                body = {"model": MODEL, "messages": [{"role": "user", "content": "soak"}], "max_tokens": 20}
                try:
                    limit = aiohttp.ClientTimeout(total=HANG_AFTER_S)
                    async with session.post(url, json=body, timeout=limit) as reply:
                        await reply.read()
                        outcome = "ok" if reply.status == 200 else f"http_{reply.status}"
                except TimeoutError:
                    outcome = "hung"
                except aiohttp.ClientError:
                    outcome = "gateway_unreachable"
                self.stats.record(started, "gateway", outcome, 0)
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ faults and sampling

    async def _killer(self, deadline: float) -> None:
        while True:
            await asyncio.sleep(self.args.kill_every)
            if time.monotonic() + 5 > deadline:
                return
            victim = self.rng.choice(self.workers)
            if victim.popen is not None and victim.popen.poll() is None:
                victim.popen.kill()
                victim.popen.wait()
            self.kills += 1
            await asyncio.sleep(1.0)
            victim.restarts += 1
            victim.start(self.env)

    async def _sampler(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            sample: dict[str, float] = {"t": round(time.monotonic() - self.t0, 1)}
            for child in self.children:
                if child.popen is not None and child.popen.poll() is None:
                    sample[f"{child.role}_rss_mib"] = round(_proc_rss_kib(child.pid) / 1024, 2)
                    sample[f"{child.role}_fds"] = _proc_fds(child.pid)
            self.samples.append(sample)
            await asyncio.sleep(SAMPLE_EVERY_S)

    # ------------------------------------------------------------------ report

    def _growth(self, key: str) -> dict[str, float] | None:
        warm = [s for s in self.samples if s["t"] >= self.args.warmup_s and key in s]
        if len(warm) < 4:
            return None
        tail = warm[-max(2, len(warm) // 10) :]
        start = statistics.mean(s[key] for s in warm[:2])
        end = statistics.mean(s[key] for s in tail)
        growth = round(end / start - 1, 4) if start else 0.0
        return {"after_warmup": round(start, 2), "end": round(end, 2), "growth": growth}

    def _summary(self) -> dict[str, object]:
        latencies = sorted(self.stats.latencies_ms)
        total = sum(self.stats.outcomes.values())
        memory = {role: self._growth(f"{role}_rss_mib") for role in ("broker", "gateway")}
        fds = {role: self._growth(f"{role}_fds") for role in ("broker", "gateway")}
        lost = self.stats.outcomes.get("hung", 0) + self.stats.outcomes.get("short", 0)
        summary: dict[str, object] = {
            "minutes": self.args.minutes,
            "requests": total,
            "outcomes": dict(self.stats.outcomes),
            "worker_kills": self.kills,
            "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
            "memory": memory,
            "fds": fds,
            "targets": {
                "memory_growth_le_5pct": all(m is None or m["growth"] <= MEMORY_GROWTH_TARGET for m in memory.values()),
                "no_fd_leak": all(f is None or f["end"] <= f["after_warmup"] + 2 for f in fds.values()),
                "no_request_lost_without_error": lost == 0,
            },
        }
        self._write(summary)
        return summary

    def _write(self, summary: dict[str, object]) -> None:
        keys = sorted({k for s in self.samples for k in s}, key=lambda k: (k != "t", k))
        with (self.out / "samples.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.samples)
        with (self.out / "requests.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["time", "kind", "outcome", "ms", "tokens"])
            writer.writerows(self.stats.rows)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (rss, fds) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        roles = [c.role for c in self.children]
        for role in roles:
            points = [(s["t"], s[f"{role}_rss_mib"]) for s in self.samples if f"{role}_rss_mib" in s]
            if points:
                rss.plot(*zip(*points, strict=True), label=role)
            points = [(s["t"], s[f"{role}_fds"]) for s in self.samples if f"{role}_fds" in s]
            if points:
                fds.plot(*zip(*points, strict=True), label=role)
        rss.set_ylabel("RSS (MiB)")
        fds.set_ylabel("open descriptors")
        fds.set_xlabel("seconds")
        rss.axvline(self.args.warmup_s, color="grey", linestyle=":")
        fds.axvline(self.args.warmup_s, color="grey", linestyle=":")
        rss.legend(fontsize="small", ncol=3)
        rss.set_title(f"llm-mesh soak: {self.args.minutes} min, {self.kills} worker kills (synthetic engine)")
        fig.tight_layout()
        fig.savefig(self.out / "soak.png", dpi=100)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default: 30)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSVs, summary.json and soak.png")
    parser.add_argument("--workers", type=int, default=3, help="synthetic workers (default: 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent client loops (default: 16)")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between worker kills (default: 30)")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="synthetic delay between tokens (default: 5)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="seconds before memory is compared (default: 60)")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false", help="leave the OpenAI gateway out")
    parser.add_argument("--seed", type=int, default=7, help="load and kill schedule seed (default: 7)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = asyncio.run(Soak(args).run())
    print(json.dumps(summary, indent=2))
    print(f"plot: {args.out / 'soak.png'}")
    targets = summary["targets"]
    assert isinstance(targets, dict)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
