"""Real processes on loopback for tests: free ports, readiness waits, guaranteed clean-up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

# The process helpers are shared with the benchmarks: one implementation, in bench/processes.py.
from bench.processes import (  # noqa: F401 (re-exported for the tests)
    Process,
    ProcessGroup,
    _port_free,
    free_broker_url,
    free_port,
    mesh_env,
)
from mesh.client import MeshClient

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / ".mesh-test-artifacts"


async def wait_for_workers(client: MeshClient, count: int, timeout: float = 30.0, model: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        workers = client.workers() if model is None else client.models().get(model, [])
        if len(workers) == count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"expected {count} workers, see {[w.worker_id for w in workers]}")
        await asyncio.sleep(0.02)


def wait_until(predicate, timeout: float, interval: float = 0.02, message: str = "condition") -> float:  # type: ignore[no-untyped-def]
    """Polls until predicate() is true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{message} not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start
