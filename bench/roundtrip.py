"""roundtrip (issue 2): one-token requests, one at a time, MeshClient -> broker -> worker -> back.

The worker runs the synthetic engine with no delay (fake tokens): the figure is
the mesh's own round trip.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.mesh_stack import SYNTHETIC_MODEL, start_synthetic_mesh
from bench.profile import Profiler
from bench.report import SuiteResult, Target
from bench.stats import Dist, ms
from mesh.client import MeshClient
from mesh.protocol import GenerateRequest

P50_TARGET_MS = 0.5
WARMUP = 50
#: Seconds py-spy samples each process with --profile (the measurement should last at least this).
PROFILE_SECONDS = 5


async def measure(client: MeshClient, requests: int, progress: bool) -> list[float]:
    from tqdm import tqdm

    request = GenerateRequest(model=SYNTHETIC_MODEL, prompt="ping", max_tokens=1)
    samples: list[float] = []
    for i in tqdm(range(WARMUP + requests), desc="roundtrip", disable=not progress, unit="req"):
        start = time.perf_counter()
        # The client's default: no per-frame timeout (the bus's liveness checks stand in for it).
        async for _ in client.generate(request):
            pass
        if i >= WARMUP:
            samples.append(ms(time.perf_counter() - start))
    return samples


async def run(out: Path, *, requests: int, progress: bool = True, profile: bool = False) -> SuiteResult:
    mesh = await start_synthetic_mesh(out / "logs" / "roundtrip", capacity=4, gateway=False)
    profiler = Profiler(out)
    with mesh.group:
        async with MeshClient(mesh.broker_url) as client:
            await client.wait_for_models([SYNTHETIC_MODEL])
            if profile:
                await measure(client, WARMUP, False)
                broker, worker = mesh.group.processes[:2]
                for name, pid in (
                    ("roundtrip-broker", broker.pid),
                    ("roundtrip-worker", worker.pid),
                    ("roundtrip-client", os.getpid()),
                ):
                    profiler.start(name, pid, PROFILE_SECONDS)
            samples = await measure(client, requests, progress)
    profiles = profiler.finish() if profile else {}
    dist = Dist.of(samples)
    return SuiteResult(
        "roundtrip",
        params={"requests": requests, "warmup": WARMUP, "max_tokens": 1, "engine": "synthetic, no delay"},
        results={"roundtrip_ms": dist},
        summary={"roundtrip_ms": {"p50": dist.p50, "p99": dist.p99}, **({"profiles": profiles} if profiles else {})},
        targets=[Target("one-token round trip p50 (ms)", f"<= {P50_TARGET_MS}", dist.p50, dist.p50 <= P50_TARGET_MS)],
    )
