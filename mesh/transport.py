"""Socket construction: the options every llm-mesh socket needs, in one place."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import zmq

from mesh.protocol import MAX_MESSAGE_BYTES
from mesh.security import Role, SecurityConfig, secure_client, secure_server

#: Milliseconds an unsent message may hold a closing socket (never block shutdown).
LINGER_MS = 0
#: Messages queued per peer before sends fail fast instead of growing memory.
HIGH_WATER_MARK = 10_000
#: ZMTP heartbeats (answered by ZeroMQ's I/O thread, so a busy event loop does not miss them): a
#: connection whose peer stops answering (a host gone, a cable pulled) is closed and redialled
#: within seconds, where TCP alone would wait many minutes.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000

log = logging.getLogger("mesh.transport")

S = TypeVar("S", bound=zmq.Socket)


def _common(sock: S) -> S:
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock


def bind(context: zmq.Context[S], kind: int, endpoint: str, security: SecurityConfig, role: Role) -> S:
    sock = _common(context.socket(kind))
    if kind == zmq.ROUTER:
        # Fail loudly on a vanished peer instead of dropping its messages.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that redials with its identity (a worker after a network blip) takes it over at once,
        # rather than being turned away until the old connection times out.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    secure_server(sock, security, role)
    sock.bind(endpoint)
    return sock


#: The longest a peer waits between two redials of a broker that went away (ZeroMQ doubles the
#: interval from 0.1 s up to this).
RECONNECT_INTERVAL_MAX_S = 1.0


def connect(
    context: zmq.Context[S], kind: int, endpoint: str, security: SecurityConfig, identity: bytes | None = None
) -> S:
    sock = _common(context.socket(kind))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    # Reconnect quickly after a broker restart.
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, round(RECONNECT_INTERVAL_MAX_S * 1000))
    secure_client(sock, security)
    sock.connect(endpoint)
    return sock


# The hot path calls the C-level send and recv directly, with plain int flags: pyzmq's
# send_multipart / recv_multipart spend most of their time in enum flag arithmetic
# and type checks (a profile of the broker: over half its time), not in libzmq.
_raw_send = zmq.backend.Socket.send
_raw_recv = zmq.backend.Socket.recv
_raw_get = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK


def send_nowait(sock: zmq.Socket, frames: list[bytes]) -> None:
    """send_multipart(frames, NOBLOCK), about 5x cheaper; raises zmq.Again (or ZMQError) as it does."""
    for frame in frames[:-1]:
        _raw_send(sock, frame, _SNDMORE_NOBLOCK)
    _raw_send(sock, frames[-1], _NOBLOCK)


def recv_nowait(sock: zmq.Socket) -> list[bytes]:
    """recv_multipart(NOBLOCK) as bytes, about 2x cheaper; raises zmq.Again when nothing waits."""
    return _with_rest(sock, _raw_recv(sock, _NOBLOCK, False))


def recv_nowait_with_user(sock: zmq.Socket) -> tuple[list[bytes], str | None]:
    """recv_nowait, plus who sent it: the ZAP User-Id, which under CURVE is the sender's z85 public key."""
    frame = _raw_recv(sock, _NOBLOCK, False)
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:  # a message with no such property: no ZAP handler admitted its sender
        user = None
    return _with_rest(sock, frame), user


def _with_rest(sock: zmq.Socket, frame: zmq.Frame) -> list[bytes]:
    """The message that begins with `frame`, as bytes (its other frames are already queued)."""
    parts = [frame.bytes]
    while frame.more:
        frame = _raw_recv(sock, _NOBLOCK, False)
        parts.append(frame.bytes)
    return parts


class AsyncChannel:
    """A plain ZeroMQ socket driven from asyncio, with no task between the socket and its reader.

    Incoming messages go to `on_message` straight from the event loop's readiness
    callback, drained with non-blocking receives (about 3x faster than awaiting
    each message, and one task wake-up less per message than a reader task).
    `on_message` must not block; whatever it raises is logged and the message
    dropped. Sends go out at once when the socket takes them; when it is full
    they wait, in order, in an outbox that a flusher task empties, so frames of
    one request never overtake each other.

    ZeroMQ's notification descriptor is edge-triggered, and any send may
    consume a pending edge, so readiness is re-checked through ZMQ_EVENTS after
    every send.
    """

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None]) -> None:
        self.socket = sock
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._writable = asyncio.Event()
        self._outbox: deque[list[bytes]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._drain_pending = False
        self._fd = sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._on_ready)
        self._loop.call_soon(self._on_ready)  # messages may have arrived before the reader was added

    def _on_ready(self) -> None:
        self._drain_pending = False
        if self.socket.closed:
            return  # a readiness check scheduled before close
        events = _raw_get(self.socket, _EVENTS)
        if events & _POLLOUT:
            self._writable.set()
        if events & _POLLIN:
            self._drain()

    def _drain(self, limit: int = 512) -> None:
        sock, handle = self.socket, self._on_message
        for _ in range(limit):
            try:
                frames = recv_nowait(sock)
            except zmq.ZMQError:  # Again, or closed under us
                return
            try:
                handle(frames)
            except Exception:
                log.exception("dropped a message its handler could not take")
            # Asking is cheaper than the zmq.Again a receive raises on an empty socket, and most
            # wake-ups bring one message. It also leaves the descriptor ready to signal the next one.
            try:
                if not _raw_get(sock, _EVENTS) & _POLLIN:
                    return
            except zmq.ZMQError:  # the handler closed it
                return
        self._schedule_drain()  # more is waiting: let other callbacks run first

    def _schedule_drain(self) -> None:
        if not self._drain_pending:
            self._drain_pending = True
            self._loop.call_soon(self._on_ready)

    def _after_send(self) -> None:
        # The send may have consumed the edge of messages that arrived meanwhile.
        if _raw_get(self.socket, _EVENTS) & _POLLIN:
            self._schedule_drain()

    def send(self, frames: list[bytes]) -> None:
        if not self._outbox:
            try:
                send_nowait(self.socket, frames)
            except zmq.Again:
                pass
            else:
                self._after_send()
                return
        self._outbox.append(frames)
        if self._flusher is None:
            self._flusher = self._loop.create_task(self._flush())

    @property
    def backlog(self) -> int:
        return len(self._outbox)

    async def _flush(self) -> None:
        try:
            while self._outbox:
                try:
                    send_nowait(self.socket, self._outbox[0])
                except zmq.Again:
                    self._writable.clear()
                    if not _raw_get(self.socket, _EVENTS) & _POLLOUT:
                        await self._writable.wait()
                    continue
                self._outbox.popleft()
                self._after_send()
        finally:
            self._flusher = None

    def close_now(self) -> asyncio.Task[None] | None:
        """Closes the socket at once (unsent messages are dropped); returns the cancelled flusher
        task, if one was running, for the caller to await."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
        self._outbox.clear()
        self._loop.remove_reader(self._fd)
        self.socket.close(linger=0)
        return flusher

    async def close(self) -> None:
        flusher = self.close_now()
        if flusher is not None:
            await asyncio.gather(flusher, return_exceptions=True)


class ConnectionWatch:
    """Calls `on_lost` each time an established connection of a connecting socket drops.

    ZeroMQ redials by itself, but messages that were on their way over the old
    connection, either way, are gone, and neither end is told: the owner decides
    what that means for its work in flight. A handshake that never succeeded
    (a refused CURVE key) lost nothing and is not reported.
    """

    _EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED

    def __init__(self, sock: zmq.Socket, on_lost: Callable[[], None]) -> None:
        self._socket = sock
        self._on_lost = on_lost
        self._established = False
        self._channel = AsyncChannel(sock.get_monitor_socket(self._EVENTS), self._on_event)

    def _on_event(self, frames: list[bytes]) -> None:
        from zmq.utils.monitor import parse_monitor_message

        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._established = True
        elif event == zmq.EVENT_DISCONNECTED and self._established:
            self._established = False
            self._on_lost()

    def close(self) -> None:
        """Before the watched socket closes: closing it is not a loss to report."""
        self._socket.disable_monitor()
        self._channel.close_now()  # the monitor's channel never sends: nothing left to await
