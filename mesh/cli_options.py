"""Options and plumbing shared by every `mesh` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mesh.endpoints import DEFAULT_BROKER_URL
from mesh.security import SecurityConfig


def add_mesh_options(parser: argparse.ArgumentParser) -> None:
    """--broker, --keys, --insecure and --log-level: what every process needs."""
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
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
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
