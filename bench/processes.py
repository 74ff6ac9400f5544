"""Start the processes a benchmark measures: free loopback ports, readiness waits, sure clean-up.

Shared with the tests (tests/support.py imports the process helpers from here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.endpoints import PORTS_PER_BROKER

REPO_ROOT = Path(__file__).resolve().parent.parent


class StartupError(RuntimeError):
    """A process the benchmark needs did not come up; the message says why (a suite records it as skipped)."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: Where listening ports are picked: below the kernel's ephemeral range, which every outgoing
#: connection takes its source port from. A port picked there could be taken by some connection
#: between the check and the server's bind (it happened: a broker failed with "address in use").
_FIRST_PORT = 20000


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(count: int = 1) -> int:
    """A free loopback port (the first of `count` consecutive free ones) outside the ephemeral range."""
    last = max(_ephemeral_start(), _FIRST_PORT + 1000) - count
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(_FIRST_PORT, last)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports from {_FIRST_PORT} to {last + count}")


def free_broker_url() -> str:
    """A broker URL whose port and the three after it are free."""
    return f"tcp://127.0.0.1:{free_port(PORTS_PER_BROKER)}"


def mesh_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


#: How every mesh process is started: this interpreter, the CLI module.
MESH_CLI = (sys.executable, "-m", "mesh.cli")


def synthetic_worker_command(url: str, models: str, *args: str, cli: Sequence[str] = MESH_CLI) -> list[str]:
    """`mesh worker` on the synthetic engine (fake tokens; for benchmarks and fault tests, not a model)."""
    return [*cli, "worker", "--broker", url, "--backend", "synthetic", "--model-names", models, *args]


@dataclass
class Process:
    """A child process with its output in a log file."""

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

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class ProcessGroup:
    """Starts `mesh` commands and other programs; stop_all() ends every one of them."""

    workdir: Path
    processes: list[Process] = field(default_factory=list)
    #: How `mesh` commands start (bench.timeline puts its probes in front of them).
    cli: Sequence[str] = MESH_CLI

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{len(self.processes):02d}-{name}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env or mesh_env(),
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        log.close()
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def mesh(self, name: str, *args: str, env: dict[str, str] | None = None) -> Process:
        return self.start(name, [*self.cli, *args], env)

    def broker(self, url: str, *args: str) -> Process:
        return self.mesh("broker", "broker", "--broker", url, *args)

    def synthetic_worker(self, url: str, worker_id: str, *args: str, models: str = "synthetic") -> Process:
        """A worker on the synthetic engine (fake tokens; for benchmarks and fault tests, not a model)."""
        command = synthetic_worker_command(url, models, "--worker-id", worker_id, *args, cli=self.cli)
        return self.start(f"worker-{worker_id}", command)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=5)
        for process in self.processes:  # anything a process started in its session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    def dump_logs(self) -> str:
        return "\n".join(f"----- {p.name} (exit {p.popen.returncode})\n{p.output()}" for p in self.processes)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


# ---------------------------------------------------------------------- readiness


async def wait_for_models(
    broker_url: str, models: Sequence[str], watch: Sequence[Process], timeout: float
) -> list[str]:
    """Waits until the bus shows a worker for every model (for any model when none is named).

    Returns the models on offer; StartupError if a watched process dies first.
    """
    from mesh.client import MeshClient

    deadline = time.monotonic() + timeout
    async with MeshClient(broker_url) as client:
        while not (set(models) <= set(client.models()) if models else client.models()):
            _check_alive(watch)
            if time.monotonic() > deadline:
                raise StartupError(f"no worker for {', '.join(models) or 'any model'} after {timeout:.0f} s")
            await asyncio.sleep(0.05)
        return sorted(client.models())


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


async def wait_for_http(url: str, watch: Sequence[Process], timeout: float) -> None:
    """Waits until GET url answers 2xx; StartupError if a watched process dies first."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(http_ok, url):
        _check_alive(watch)
        if time.monotonic() > deadline:
            raise StartupError(f"{url} did not answer within {timeout:.0f} s")
        await asyncio.sleep(0.25)


def _check_alive(watch: Sequence[Process]) -> None:
    for process in watch:
        if not process.alive():
            raise StartupError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")


def mesh_command_help(*command: str) -> str:
    """`mesh COMMAND --help` text ('' when the command does not exist)."""
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", *command, "--help"],
        capture_output=True,
        text=True,
        env=mesh_env(),
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    return result.stdout if result.returncode == 0 else ""


async def start_gateway(group: ProcessGroup, broker_url: str, *args: str, timeout: float = 60.0) -> str:
    """Starts `mesh gateway openai` (with `args`) on a free loopback port; returns its base URL (…/v1)."""
    help_text = await asyncio.to_thread(mesh_command_help, "gateway", "openai")
    if "--port" not in help_text:
        raise StartupError("`mesh gateway openai` is not available (no --port option)")
    port = free_port()
    gateway = group.mesh(
        "gateway", "gateway", "openai", "--broker", broker_url, "--host", "127.0.0.1", "--port", str(port), *args
    )
    base = f"http://127.0.0.1:{port}"
    await wait_for_http(f"{base}/health", [gateway], timeout)
    return f"{base}/v1"
