"""Options and plumbing shared by every `mesh` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from mesh.cpu_latency import MAX_CPU_LATENCY_US, hold_cpu_latency
from mesh.endpoints import DEFAULT_BROKER_URL
from mesh.security import SecurityConfig


def add_mesh_options(parser: argparse.ArgumentParser) -> None:
    """--broker, --keys, --insecure, --cpus, --cpu-latency-us and --log-level: what every process needs."""
    group = parser.add_argument_group("mesh")
    group.add_argument(
        "--broker",
        default=DEFAULT_BROKER_URL,
        metavar="URL",
        help=f"the broker's front address; every other endpoint derives from it (default: {DEFAULT_BROKER_URL})",
    )
    group.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="CURVE key folder made by `mesh keys init`: encrypt and authenticate every mesh socket",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding a non-loopback address without CURVE keys (anyone who reaches it can join)",
    )
    group.add_argument(
        "--cpus",
        type=cpu_list,
        metavar="LIST",
        help="run this process, its ZeroMQ I/O thread included, on these CPUs only (e.g. 0 or 0,2-3), as "
        "taskset would. On VMs where waking a thread on another CPU is slow, a process whose threads share "
        "a CPU answers sooner: see bench/README.md",
    )
    add_cpu_latency_option(group)
    group.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )


def cpu_list(value: str) -> frozenset[int]:
    """'0,2-3' -> {0, 2, 3}."""
    cpus: set[int] = set()
    try:
        for part in value.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {value!r} (e.g. 0 or 0,2-3)") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"not a CPU list: {value!r} (e.g. 0 or 0,2-3)")
    return frozenset(cpus)


def cpu_list_text(cpus: frozenset[int] | set[int]) -> str:
    """{0, 2, 3} -> '0,2-3', the form --cpus takes."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


#: Lowest and highest TCP port a server here may listen on (0, "any free port", would leave no URL to print).
MIN_PORT, MAX_PORT = 1, 65535


def port_number(value: str) -> int:
    """An argparse type for every port option: a bad port stops at parsing with one line, not a traceback later."""
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not MIN_PORT <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"expected a port from {MIN_PORT} to {MAX_PORT}, got {value!r}")
    return port


def add_cpu_latency_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--cpu-latency-us",
        type=microseconds,
        metavar="N",
        help="while this process runs, ask Linux (PM QoS, /dev/cpu_dma_latency) to keep idle CPUs in sleep "
        "states that wake within N us; 0 keeps them polling. Wake-ups between the mesh's threads get cheaper, "
        "much so on VMs; system-wide, costs power, needs write access to the device (root). See README, "
        "Performance",
    )


def microseconds(value: str) -> int:
    try:
        us = int(value)
    except ValueError:
        us = -1
    if not 0 <= us <= MAX_CPU_LATENCY_US:
        raise argparse.ArgumentTypeError(f"expected a whole number of microseconds >= 0, got {value!r}")
    return us


@contextmanager
def process_options(args: argparse.Namespace) -> Iterator[None]:
    """Set up before the command starts any thread, held until it returns: logging, the CPU set threads
    inherit, and the CPU latency request."""
    setup_logging(getattr(args, "log_level", "INFO"))
    cpus = getattr(args, "cpus", None)
    if cpus:
        set_cpus(cpus)
    latency_us = getattr(args, "cpu_latency_us", None)
    with hold_cpu_latency(latency_us):
        if latency_us is not None:
            logging.getLogger("mesh").info("idle CPUs held to a wake-up latency of %d us while this runs", latency_us)
        yield


def set_cpus(cpus: frozenset[int]) -> None:
    """Pins this process; a CPU it cannot use is a ValueError naming --cpus and the CPUs it may use."""
    available = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
        missing = cpus - os.sched_getaffinity(0)  # the kernel drops unusable CPUs silently when others remain
    except OSError:  # none usable: EINVAL, which names no CPU
        missing = cpus
    if missing:
        raise ValueError(
            f"--cpus {cpu_list_text(cpus)}: this process cannot run on CPU{'s' * (len(missing) > 1)} "
            f"{cpu_list_text(missing)}; CPUs available to it: {cpu_list_text(available)}"
        )


def security_from_args(args: argparse.Namespace) -> SecurityConfig:
    return SecurityConfig(keys_dir=args.keys, insecure=args.insecure)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def comma_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class Service(Protocol):
    """A long-running part of the mesh: run() serves until stop() is called."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


def run_service(make_service: Callable[[], Service]) -> None:
    """Builds the service inside a uvloop event loop and runs it; SIGINT and SIGTERM stop it."""
    import uvloop

    async def main() -> None:
        service = make_service()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
