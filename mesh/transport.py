"""Socket construction: the options every llm-mesh socket needs, in one place."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TypeVar

import zmq
import zmq.asyncio

from mesh.protocol import MAX_MESSAGE_BYTES
from mesh.security import Role, SecurityConfig, secure_client, secure_server

#: Milliseconds an unsent message may hold a closing socket (never block shutdown).
LINGER_MS = 0
#: Messages queued per peer before sends fail fast instead of growing memory.
HIGH_WATER_MARK = 10_000

S = TypeVar("S", bound=zmq.Socket)


def _common(sock: S) -> S:
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


def bind(context: zmq.Context[S], kind: int, endpoint: str, security: SecurityConfig, role: Role) -> S:
    sock = _common(context.socket(kind))
    if kind == zmq.ROUTER:
        # Fail loudly on a vanished peer instead of dropping its messages.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    secure_server(sock, security, role)
    sock.bind(endpoint)
    return sock


def connect(
    context: zmq.Context[S], kind: int, endpoint: str, security: SecurityConfig, identity: bytes | None = None
) -> S:
    sock = _common(context.socket(kind))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    # Reconnect quickly after a broker restart.
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    secure_client(sock, security)
    sock.connect(endpoint)
    return sock


class AsyncChannel:
    """An asyncio socket with a non-blocking fast path.

    Receives await readability once, then drain with non-blocking calls on a
    shadow of the same socket (about 3x faster than awaiting each message).
    Sends go out at once when the socket takes them; when it is full, they
    wait in order in an outbox that a flusher task empties, so frames of one
    request never overtake each other.
    """

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.socket = sock
        self._sync = zmq.Socket.shadow(sock.underlying)
        self._outbox: deque[list[bytes]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    async def receive_batch(self, limit: int = 512) -> list[list[bytes]]:
        await self.socket.poll(flags=zmq.POLLIN)
        batch: list[list[bytes]] = []
        recv = self._sync.recv_multipart
        try:
            while len(batch) < limit:
                batch.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass
        return batch

    def send(self, frames: list[bytes]) -> None:
        if not self._outbox:
            try:
                self._sync.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        self._outbox.append(frames)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    @property
    def backlog(self) -> int:
        return len(self._outbox)

    async def _flush(self) -> None:
        try:
            while self._outbox:
                await self.socket.send_multipart(self._outbox[0])
                self._outbox.popleft()
        finally:
            self._flusher = None

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._outbox.clear()
        self.socket.close(linger=0)
