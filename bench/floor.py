"""The transport floor: the overhead suite's gateway path with nothing of the stack on it.

Three bare programs on the transports the mesh uses, placed as the mesh places
its processes:

    front   HTTP/1.1 on uvloop with no framework; forwards each request over a
            ZeroMQ DEALER and writes the replies out as chunked SSE events
    relay   a ROUTER-to-ROUTER relay where the broker would be
    worker  a DEALER that answers every request with two frames, a first token
            and a last one, as a paced worker answers a zero-delay stream

None of them parses, validates, dispatches or accounts for anything; each uses
the same raw ZeroMQ calls as the mesh (`mesh.transport`). What a request costs
on this path is what one HTTP hop and four ZeroMQ hops between three Python
processes cost on the machine: the least any stack built that way can add. The
overhead suite measures it beside the stack in the same run, so that a figure
from a busy host can be read against the host's own floor.

    python -m bench.floor relay FRONT_URL BACK_URL
    python -m bench.floor worker BACK_URL
    python -m bench.floor front PORT FRONT_URL TOKENS
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import Sequence
from typing import cast

import orjson
import zmq

from bench.processes import ProcessGroup, free_port, wait_for_http
from mesh.transport import recv_nowait, send_nowait

#: Worker -> front: the frame that carries the first token, and the last one (with usage).
FIRST, LAST = b"F", b"L"
#: Front -> worker and back: a request, and the readiness ping (no connection behind it).
REQUEST, PING = b"R", b"P"
_NO_CONNECTION = b""

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_HEALTH_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_HEALTH_WAIT = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nwait"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _replies(tokens: int) -> tuple[bytes, bytes]:
    """The bytes the front writes for FIRST and for LAST: the same events the gateway sends, pre-built."""
    first = _event({"object": "text_completion", "choices": [{"index": 0, "text": " token", "finish_reason": None}]})
    last = (
        _event({"object": "text_completion", "choices": [{"index": 0, "text": " rest", "finish_reason": "length"}]})
        + _event({"object": "text_completion", "choices": [], "usage": {"completion_tokens": tokens}})
        + b"data: [DONE]\n\n"
    )
    return _HEAD + _chunk(first), _chunk(last) + b"0\r\n\r\n"


# ---------------------------------------------------------------------- relay


def run_relay(front_url: str, back_url: str) -> None:
    context = zmq.Context()
    front, back = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    for sock, url in ((front, front_url), (back, back_url)):
        sock.linger = 0
        sock.bind(url)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    worker: bytes | None = None
    while True:
        for sock, _ in poller.poll():
            if sock is back:
                worker_id, *rest = recv_nowait(back)
                worker = worker_id
                if len(rest) == 3:  # [front, connection, kind]; a lone frame is the worker's hello
                    send_nowait(front, rest)
            else:
                frames = recv_nowait(front)
                if worker is not None:  # before the worker's hello, the front's ping goes unanswered
                    send_nowait(back, [worker, *frames])


# ---------------------------------------------------------------------- worker


def run_worker(back_url: str) -> None:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(back_url)
    sock.send(b"hello")
    while True:
        sock.poll()
        front, connection, kind = recv_nowait(sock)
        if kind == PING:
            send_nowait(sock, [front, connection, PING])
        else:
            send_nowait(sock, [front, connection, FIRST])
            send_nowait(sock, [front, connection, LAST])


# ---------------------------------------------------------------------- front


class _Front:
    """One DEALER to the relay, and the open HTTP connections by id."""

    def __init__(self, relay_url: str, tokens: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.socket = zmq.Context().socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(relay_url)
        self.connections: dict[bytes, _Connection] = {}
        self.ready = False
        self.first, self.last = _replies(tokens)
        self._ids = itertools.count(1)
        self.loop.add_reader(self.socket.getsockopt(zmq.FD), self._drain)
        self._ping()

    def new_id(self) -> bytes:
        return next(self._ids).to_bytes(8, "little")

    def send(self, connection: bytes, kind: bytes) -> None:
        send_nowait(self.socket, [connection, kind])
        # The notification descriptor is edge-triggered, and a send can take the edge.
        if self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self._drain)

    def _ping(self) -> None:
        if not self.ready:
            self.send(_NO_CONNECTION, PING)
            self.loop.call_later(0.05, self._ping)

    def _drain(self) -> None:
        while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            connection, kind = recv_nowait(self.socket)
            if kind == PING:
                self.ready = True
            elif (peer := self.connections.get(connection)) is not None:
                peer.transport.write(self.first if kind == FIRST else self.last)


class _Connection(asyncio.Protocol):
    def __init__(self, front: _Front) -> None:
        self.front = front
        self.id = front.new_id()
        self.buffer = b""
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.front.connections[self.id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.pop(self.id, None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            if (at := head.find(b"content-length:")) >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if head.startswith(b"get"):
                self.transport.write(_HEALTH_OK if self.front.ready else _HEALTH_WAIT)
            else:
                self.front.send(self.id, REQUEST)


async def serve_front(port: int, relay_url: str, tokens: int) -> None:
    front = _Front(relay_url, tokens)
    server = await front.loop.create_server(lambda: _Connection(front), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------- the bench side


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.floor", *args]


async def start_floor(group: ProcessGroup, tokens: int) -> str:
    """Starts relay, worker and front in `group`; returns the front's base URL (…/v1), once a ping got through."""
    base = free_port(2)
    front_url, back_url = f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}"
    port = free_port()
    processes = [
        group.start("floor-relay", _command("relay", front_url, back_url)),
        group.start("floor-worker", _command("worker", back_url)),
        group.start("floor-front", _command("front", str(port), front_url, str(tokens))),
    ]
    await wait_for_http(f"http://127.0.0.1:{port}/health", processes, timeout=30)
    return f"http://127.0.0.1:{port}/v1"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    relay = sub.add_parser("relay")
    relay.add_argument("front_url")
    relay.add_argument("back_url")
    worker = sub.add_parser("worker")
    worker.add_argument("back_url")
    front = sub.add_parser("front")
    front.add_argument("port", type=int)
    front.add_argument("relay_url")
    front.add_argument("tokens", type=int)
    args = parser.parse_args(argv)
    if args.role == "relay":
        run_relay(args.front_url, args.back_url)
    elif args.role == "worker":
        run_worker(args.back_url)
    else:
        import uvloop

        uvloop.run(serve_front(args.port, args.relay_url, args.tokens))


if __name__ == "__main__":
    main()
