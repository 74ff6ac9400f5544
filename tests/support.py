"""Real processes on loopback for tests: free ports, readiness waits, guaranteed clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.client import MeshClient
from mesh.endpoints import PORTS_PER_BROKER

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / ".mesh-test-artifacts"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_broker_url() -> str:
    """A broker URL whose port and the three after it are free."""
    for _ in range(200):
        base = free_port()
        if base + PORTS_PER_BROKER < 65535 and all(_port_free(base + i) for i in range(PORTS_PER_BROKER)):
            return f"tcp://127.0.0.1:{base}"
    raise RuntimeError("no four consecutive free ports")


def mesh_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Process:
    """A child process with its output in a log file (printed when a test fails)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class ProcessGroup:
    """Starts `mesh` commands and other programs; stop_all() ends every one of them."""

    workdir: Path
    processes: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.workdir / f"{len(self.processes):02d}-{name}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=env or mesh_env(), cwd=REPO_ROOT,
            start_new_session=True,
        )
        log.close()
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def mesh(self, name: str, *args: str, env: dict[str, str] | None = None) -> Process:
        return self.start(name, [sys.executable, "-m", "mesh.cli", *args], env)

    def broker(self, url: str, *args: str) -> Process:
        return self.mesh("broker", "broker", "--broker", url, *args)

    def synthetic_worker(self, url: str, worker_id: str, *args: str, models: str = "synthetic") -> Process:
        """A worker on the synthetic engine (fake tokens; for fault tests, not a model)."""
        return self.mesh(
            f"worker-{worker_id}", "worker", "--broker", url, "--backend", "synthetic",
            "--model-names", models, "--worker-id", worker_id, *args,
        )

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=5)
        for process in self.processes:  # anything a process started in its session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    def dump_logs(self) -> str:
        return "\n".join(f"----- {p.name} (exit {p.popen.returncode})\n{p.output()}" for p in self.processes)


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
