"""Real processes on loopback for tests: free ports, readiness waits, guaranteed clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import zmq

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
from mesh.endpoints import Endpoints
from mesh.protocol import Announcement, Kind, encode, pack_header

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


@contextlib.asynccontextmanager
async def hand_made_worker(broker_url: str, worker_id: str, model: str, capacity: int = 1) -> AsyncIterator[zmq.Socket]:
    """A worker played by the test, for frames no real worker would send: yields a DEALER on the
    broker's back port (receive SUBMITs with `recv`, send replies by hand) and announces it on the bus
    every 0.1 s while the block runs."""
    endpoints = Endpoints.from_url(broker_url)
    ctx = zmq.Context()
    try:
        back = ctx.socket(zmq.DEALER)
        back.setsockopt(zmq.IDENTITY, worker_id.encode())
        bus = ctx.socket(zmq.PUB)
        for sock, endpoint in ((back, endpoints.back), (bus, endpoints.bus_in)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        hello = Announcement(
            worker_id=worker_id, models=[model], backend="hand-made", capacity=capacity, started_at=1.0
        )

        async def heartbeat() -> None:
            while True:
                bus.send_multipart([pack_header(Kind.ANNOUNCE), encode(hello)])
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(heartbeat())
        try:
            yield back
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
    finally:
        ctx.destroy(linger=0)


async def recv(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    """A message from a plain socket, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not sock.poll(0):
        assert time.monotonic() < deadline, "nothing arrived"
        await asyncio.sleep(0.01)
    return sock.recv_multipart()


def wait_until(predicate, timeout: float, interval: float = 0.02, message: str = "condition") -> float:  # type: ignore[no-untyped-def]
    """Polls until predicate() is true; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{message} not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


class TcpRelay:
    """A loopback TCP relay in front of one port, whose connections a test can cut: a network blip
    (both ends see the connection drop; ZeroMQ redials through the relay at once)."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port, self.target_port = listen_port, target_port
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.cuts = 0

    async def __aenter__(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> int:
        """Drops every connection through the relay now; returns how many there were."""
        cut = len(self._transports) // 2
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        self.cuts += cut
        return cut

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._transports += [writer.transport, target_writer.transport]
        for source, sink in ((reader, target_writer), (target_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()
