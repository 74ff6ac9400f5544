"""A synthetic mesh for the overhead suites: broker, one synthetic worker, optionally the HTTP gateway.

The synthetic engine emits fake tokens with no delay: what is measured is the
mesh's own cost, never a model's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.processes import MESH_CLI, ProcessGroup, StartupError, free_broker_url, start_gateway, wait_for_models

SYNTHETIC_MODEL = "synthetic-bench"


@dataclass(frozen=True)
class Placement:
    """The CPU (a `--cpus` value) of each process: broker, worker, gateway, and the bench process itself."""

    broker: str
    worker: str
    gateway: str
    client: str

    @classmethod
    def split(cls) -> Placement | None:
        """Broker and worker on one CPU, gateway and client on another; None with fewer than 2 CPUs.

        Each pair that talks most shares a CPU, so only the gateway-broker hop crosses CPUs.
        """
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        first, second = str(cpus[0]), str(cpus[1])
        return cls(broker=first, worker=first, gateway=second, client=second)


@dataclass
class SyntheticMesh:
    group: ProcessGroup
    broker_url: str
    gateway_url: str | None = None
    gateway_skipped: str | None = None


async def start_synthetic_mesh(
    logs: Path,
    capacity: int,
    gateway: bool,
    placement: Placement | None = None,
    worker_args: tuple[str, ...] = (),
    cli: Sequence[str] = MESH_CLI,
) -> SyntheticMesh:
    """`cli`: how each `mesh` command starts (bench.timeline's probes go in front of it)."""

    def cpus(value: str | None) -> tuple[str, ...]:
        return ("--cpus", value) if value is not None else ()

    group = ProcessGroup(logs, cli=cli)
    try:
        url = free_broker_url()
        broker = group.broker(url, "--log-level", "WARNING", *cpus(placement and placement.broker))
        worker = group.synthetic_worker(
            url,
            "bench-synthetic",
            "--capacity",
            str(capacity),
            "--log-level",
            "WARNING",
            *cpus(placement and placement.worker),
            *worker_args,
            models=SYNTHETIC_MODEL,
        )
        await wait_for_models(url, [SYNTHETIC_MODEL], [broker, worker], timeout=60)
        mesh = SyntheticMesh(group, url)
        if gateway:
            try:
                mesh.gateway_url = await start_gateway(group, url, *cpus(placement and placement.gateway))
            except StartupError as exc:
                mesh.gateway_skipped = str(exc)
        return mesh
    except BaseException:
        group.stop_all()
        raise


#: Seconds a real model may take to load (vLLM on CPU compiles for a while).
MODEL_START_TIMEOUT = 600.0
#: vLLM settings for every vLLM the bench starts. On CPU the memory share is checked against free
#: RAM at start: 0.2 lets two engines (compare) start side by side on a machine in use.
VLLM_MEMORY_SHARE = 0.2
VLLM_MAX_MODEL_LEN = 2048
VLLM_WORKER_ARGS = ("--gpu-memory-utilization", str(VLLM_MEMORY_SHARE), "--max-model-len", str(VLLM_MAX_MODEL_LEN))


async def start_model_mesh(group: ProcessGroup, backend: str, worker_args: tuple[str, ...] = ()) -> str:
    """Broker, one worker on the default model with `backend`, and the OpenAI gateway; returns the gateway's /v1 URL."""
    url = free_broker_url()
    broker = group.broker(url, "--log-level", "INFO")
    worker = group.mesh(f"worker-{backend}", "worker", "--broker", url, "--backend", backend, *worker_args)
    await wait_for_models(url, [], [broker, worker], timeout=MODEL_START_TIMEOUT)
    return await start_gateway(group, url)
