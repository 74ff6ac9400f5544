"""The broker: routes requests from clients to workers and streams tokens back.

Sockets (all derived from the one broker URL, see mesh.endpoints):
    front    ROUTER  clients submit and cancel; tokens, done and errors go back
    back     ROUTER  workers receive submits and cancels; send tokens, done, errors, bye
    bus_in   XSUB    workers publish announcements
    bus_out  XPUB    anyone subscribes: announcements, beacons, worker-gone notices

The broker is one thread running a zmq.Poller loop. Every readable socket is
drained with non-blocking receives (one poll, then receive until empty), which
relays about three times as many messages as awaiting each one. It reads only
header frames: token bodies pass through as opaque bytes.

It counts each worker's in-flight requests itself (it dispatched them), so the
dispatch policy never works from a stale heartbeat figure.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from mesh import __version__, transport
from mesh.discovery import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, expiry_after
from mesh.dispatch import POLICIES, Candidate, DispatchMethod, DispatchState
from mesh.endpoints import DEFAULT_BROKER_URL, Endpoints
from mesh.heap import freeze_startup_objects
from mesh.protocol import (
    REQUEST_ID_SIZE,
    Announcement,
    BrokerInfo,
    ErrorCode,
    ErrorReply,
    Kind,
    ProtocolError,
    WorkerGone,
    decode,
    encode,
    error_frames,
    pack_header,
    parse_header,
)
from mesh.security import REFUSAL_LOG_INTERVAL, Role, SecurityConfig, check_bind_allowed, gatekeeper_for

log = logging.getLogger("mesh.broker")

#: Messages taken from one socket before the loop looks at the others.
DRAIN_BATCH = 512
#: Longest the loop sleeps in poll, so timers and stop requests are seen.
TICK_SECONDS = 0.05
_ROUTING_ERRORS = (zmq.Again, zmq.ZMQError)
#: Shortest gap between two snapshots of the mesh on the bus (each goes to every subscriber).
SNAPSHOT_MIN_INTERVAL_S = 0.05
#: How long a worker that said BYE is remembered: its announcements still in flight on the bus arrive
#: within milliseconds; this is ample.
DEPARTED_KEEP_S = 10.0
#: Last words kept per client that is not reading; past this the oldest are dropped (and counted).
MAX_OWED_PER_CLIENT = 4096
_HEADER_TOKENS = pack_header(Kind.TOKENS)  # the hot path's header prefix


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    broker_url: str = DEFAULT_BROKER_URL
    dispatch_method: DispatchMethod = "shortest_queue"
    #: Requests per model that may wait for a free worker before `overloaded`.
    max_queue: int = 256
    #: Workers a request may be sent to before its loss is reported (worker deaths before the first token).
    max_attempts: int = 3
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    security: SecurityConfig = field(default_factory=SecurityConfig)
    seed: int | None = None


@dataclass(slots=True, eq=False)
class _Worker:
    worker_id: bytes
    announcement: Announcement
    announcement_frames: list[bytes]
    last_seen: float
    inflight: set[bytes] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _Request:
    request_id: bytes
    client: bytes
    model: str
    submit_frames: list[bytes]  # [header, model, body], re-sent as is on a retry
    worker: bytes | None = None
    started: bool = False
    attempts: int = 0
    #: A worker with this context refused the request as too long: only a longer context may take it.
    exceeds_context: int = 0
    #: That refusal, the client's answer once no worker with a longer context is left.
    refusal: list[bytes] | None = None


def warm_up_seconds(heartbeat_interval: float) -> float:
    """How long a new broker lets requests for models it has not heard of wait for their workers.

    A worker redials a restarted broker within transport.RECONNECT_INTERVAL_MAX_S, and its first
    announcement after that may be lost (a PUB socket drops what it sends before the subscription
    reaches it): so that long, and two heartbeats, with a margin.
    """
    return 1.2 * (transport.RECONNECT_INTERVAL_MAX_S + 2 * heartbeat_interval)


def _takes(worker: _Worker, longer_than: int) -> bool:
    """Whether the worker takes new work (it is not draining) with a context longer than `longer_than`
    (0: any)."""
    announcement = worker.announcement
    return not announcement.draining and (not longer_than or announcement.context_length > longer_than)


def _log_due(last_logged: dict[Any, float], key: object) -> bool:
    """Whether a warning about `key` may be logged now (once per REFUSAL_LOG_INTERVAL); notes it if so."""
    now = time.monotonic()
    if now - last_logged.get(key, float("-inf")) < REFUSAL_LOG_INTERVAL:
        return False
    last_logged[key] = now
    return True


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.endpoints = Endpoints.from_url(config.broker_url)
        check_bind_allowed(self.endpoints, config.security)
        self._own_context = context is None
        self._context = context or zmq.Context()
        # CURVE's ZAP handler must live on the same context as the sockets it guards.
        self._gatekeeper = gatekeeper_for(self._context, config.security)
        self._policy = POLICIES[config.dispatch_method]
        self._dispatch_state = DispatchState(rng=random.Random(config.seed))
        self._expiry = expiry_after(config.heartbeat_interval, config.heartbeat_liveness)
        self._workers: dict[bytes, _Worker] = {}
        self._by_model: dict[str, list[_Worker]] = {}
        self._requests: dict[bytes, _Request] = {}
        self._queues: dict[str, deque[_Request]] = {}
        #: Workers that said BYE, by id -> (the start time of that incarnation, when it left): their
        #: announcements still in flight on the bus must not bring them back. Kept for DEPARTED_KEEP_S.
        self._departed: dict[bytes, tuple[float, float]] = {}
        self._revoked_logged: dict[str | None, float] = {}
        self._duplicate_logged: dict[bytes, float] = {}
        #: Last words (error frames) for clients whose connection was full when they were due:
        #: sent as soon as the client reads again, so that no request of theirs ends in silence.
        self._owed: dict[bytes, deque[list[bytes]]] = {}
        self._next_forget = 0.0
        self._snapshot_due = False
        self._next_snapshot = 0.0
        self.dropped: Counter[str] = Counter()
        self.started_at = time.time()
        # Until every live worker has had time to announce itself (after a broker
        # restart, say), requests for models not seen yet wait instead of being refused.
        self._warm_until = time.monotonic() + warm_up_seconds(config.heartbeat_interval)
        self._stop = threading.Event()
        self._next_beacon = 0.0
        self._client_revocations = 0
        self._bus_out_bound = ""  # the bus endpoint as bound (set by bind())
        self._bus_out_unbound = False
        self._sockets_open = False

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        security = self.config.security
        ctx = self._context
        if self._gatekeeper is not None:
            self._gatekeeper.start()  # before any bind: a handshake without a ZAP handler is refused
        self.front = transport.bind(ctx, zmq.ROUTER, self.endpoints.front, security, "clients")
        self.back = transport.bind(ctx, zmq.ROUTER, self.endpoints.back, security, "workers")
        self.bus_in = transport.bind(ctx, zmq.XSUB, self.endpoints.bus_in, security, "workers")
        self.bus_out = transport.bind(ctx, zmq.XPUB, self.endpoints.bus_out, security, "clients")
        # Every subscription reaches us, so each new subscriber gets a snapshot.
        self.bus_out.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._bus_out_bound = self.bus_out.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bus_in.send(b"\x01")  # subscribe to every announcement
        if self._gatekeeper is not None:
            roles = {self.front: "clients", self.back: "workers", self.bus_in: "workers", self.bus_out: "clients"}
            self._gatekeeper.watch(roles)  # type: ignore[arg-type]
        self._sockets_open = True
        log.info("broker listening on %s (dispatch %s)", self.endpoints.front, self.config.dispatch_method)

    def stop(self) -> None:
        """Asks the loop to finish; safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> None:
        """Serves until stop(); binds first if needed, closes the sockets at the end."""
        if not self._sockets_open:
            self.bind()
        freeze_startup_objects()
        poller = zmq.Poller()
        for sock in (self.front, self.back, self.bus_in, self.bus_out):
            poller.register(sock, zmq.POLLIN)
        recv = transport.recv_nowait
        routes: dict[zmq.Socket, tuple[Callable[[zmq.Socket], Any], Callable[[Any], None]]] = {
            self.front: (recv, self._on_client),
            self.back: (recv, self._on_worker),
            self.bus_in: (recv, self._on_bus_in),
            self.bus_out: (recv, self._on_subscription),
        }
        if self._gatekeeper is not None:
            # Messages from clients and announcements from workers are checked against the allow-lists
            # as they are now, so revoking a key also stops a peer that is already connected. Token
            # frames (the hot path) are not: a worker that can no longer announce itself is soon gone.
            recv_checked = transport.recv_nowait_with_user
            routes[self.front] = (recv_checked, self._admitted("clients", self._on_client))
            routes[self.bus_in] = (recv_checked, self._admitted("workers", self._on_bus_in))
        timeout_ms = int(TICK_SECONDS * 1000)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(timeout_ms):
                    self._drain(sock, *routes[sock])
                self._tick(time.monotonic())
        finally:
            self.close()

    def close(self) -> None:
        if self._sockets_open:
            for sock in (self.front, self.back, self.bus_in, self.bus_out):
                sock.close(linger=0)
            self._sockets_open = False
        if self._gatekeeper is not None:
            # Only now: a CURVE socket with no ZAP handler admits anyone who knows the broker's key.
            self._gatekeeper.stop()
        if self._own_context:
            self._context.term()

    def _drain(self, sock: zmq.Socket, recv: Callable[[zmq.Socket], Any], handler: Callable[[Any], None]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = recv(sock)
            except zmq.Again:
                return
            try:
                handler(frames)
            except ProtocolError as exc:
                self._drop("malformed", exc)
            except Exception:
                # A fault of ours that one message brought out: that message is lost, not the mesh.
                self.dropped["broker_fault"] += 1
                log.exception("a message could not be handled; the broker carries on")

    def _admitted(
        self, role: Role, handler: Callable[[list[bytes]], None]
    ) -> Callable[[tuple[list[bytes], str | None]], None]:
        """`handler` for messages whose sender is still on `role`'s allow-list; the others are refused."""
        gatekeeper = self._gatekeeper
        assert gatekeeper is not None

        def checked(received: tuple[list[bytes], str | None]) -> None:
            frames, user = received
            if gatekeeper.admits(role, user):
                handler(frames)
            else:
                self._refuse_revoked(role, user, frames)

        return checked

    def _refuse_revoked(self, role: Role, user: str | None, frames: list[bytes]) -> None:
        self.dropped["revoked"] += 1
        if _log_due(self._revoked_logged, user):
            log.warning("refused a message on %s: public key %s is no longer on allow/%s", role, user, role)
        if role != "clients" or len(frames) < 2:
            return  # a worker's announcement: without it the worker expires like a silent one
        kind, request_id = parse_header(frames[1])
        if kind is Kind.CANCEL:
            self._on_client(frames)  # letting go of work it started before is always allowed
        elif kind is Kind.SUBMIT:
            message = "this client's key is no longer on the broker's allow-list"
            self._tell(frames[0], error_frames(request_id, ErrorCode.FORBIDDEN, message))

    def _drop(self, reason: str, detail: object) -> None:
        self.dropped[reason] += 1
        log.warning("dropped a message (%s): %s", reason, detail)

    # ------------------------------------------------------------------ clients

    def _on_client(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise ProtocolError(f"{len(frames)} frames from a client")
        client, header = frames[0], frames[1]
        kind, request_id = parse_header(header)
        if len(request_id) != REQUEST_ID_SIZE:
            raise ProtocolError(f"{kind.name} without a request id")
        if kind is Kind.SUBMIT:
            if len(frames) != 4:
                raise ProtocolError(f"SUBMIT with {len(frames)} frames")
            self._submit(client, request_id, frames[1:])
        elif kind is Kind.CANCEL:
            self._cancel(client, request_id)
        else:
            raise ProtocolError(f"{kind.name} from a client")

    def _submit(self, client: bytes, request_id: bytes, submit_frames: list[bytes]) -> None:
        try:
            model = submit_frames[1].decode()
        except UnicodeDecodeError:
            self._tell(client, error_frames(request_id, ErrorCode.BAD_REQUEST, "model name is not UTF-8"))
            return
        existing = self._requests.get(request_id)
        if existing is not None:
            # The same client again (a re-submit after our restart): it is in hand. Anyone
            # else: a replayed or colliding id must not disturb the request that owns it.
            if existing.client != client:
                self._tell(client, error_frames(request_id, ErrorCode.BAD_REQUEST, "request id already in use"))
            return
        if not self._by_model.get(model) and time.monotonic() >= self._warm_until:
            self._tell(client, self._not_found(request_id, model))
            return
        request = _Request(request_id, client, model, submit_frames)
        self._requests[request_id] = request
        if self._queues.get(model):
            self._enqueue(request)  # behind those waiting; it may still go first (see _serve_queue)
            self._serve_queue(model)
        elif not self._dispatch(request):
            self._enqueue(request)

    def _not_found(self, request_id: bytes, model: str) -> list[bytes]:
        served = ", ".join(sorted(self._by_model)) or "none"
        message = f"model {model!r} is not served by any worker (served: {served})"
        return error_frames(request_id, ErrorCode.MODEL_NOT_FOUND, message)

    def _enqueue(self, request: _Request, front: bool = False) -> None:
        queue = self._queues.setdefault(request.model, deque())
        if len(queue) >= self.config.max_queue and not front:
            del self._requests[request.request_id]
            message = f"every worker of {request.model!r} is busy and {len(queue)} requests are waiting"
            self._tell(request.client, error_frames(request.request_id, ErrorCode.OVERLOADED, message))
            return
        if front:
            queue.appendleft(request)
        else:
            queue.append(request)

    def _cancel(self, client: bytes, request_id: bytes) -> None:
        request = self._requests.get(request_id)
        if request is None or request.client != client:
            return  # already finished, or not this client's to cancel
        # The CANCEL leaves before _finish() hands the freed slot to a queued request: the worker
        # must see its slot free before the next SUBMIT arrives, or it refuses that one as full.
        if request.worker is None:
            self._queues[request.model].remove(request)
        else:
            self._to_worker(request.worker, [pack_header(Kind.CANCEL, request_id)])
        self._finish(request)

    def _reply(self, client: bytes, frames: list[bytes]) -> bool:
        """Sends to a client; False when it is gone or not reading."""
        try:
            transport.send_nowait(self.front, [client, *frames])
            return True
        except _ROUTING_ERRORS:
            return False

    def _tell(self, client: bytes, frames: list[bytes]) -> None:
        """Sends a request's last frame: now, or once the client reads again (if it is still there)."""
        owed = self._owed.get(client)
        if owed is None and self._reply(client, frames):
            return
        if owed is None:
            owed = self._owed[client] = deque()
        if len(owed) >= MAX_OWED_PER_CLIENT:
            owed.popleft()
            self.dropped["owed_overflow"] += 1
        owed.append(frames)

    def _pay_owed(self) -> None:
        for client, owed in list(self._owed.items()):
            while owed:
                try:
                    transport.send_nowait(self.front, [client, *owed[0]])
                except zmq.Again:
                    break  # still not reading
                except zmq.ZMQError:
                    owed.clear()  # gone: nobody left to tell
                    break
                owed.popleft()
            if not owed:
                del self._owed[client]

    # ------------------------------------------------------------------ dispatch

    def _free_workers(self, model: str, exclude: bytes | None = None, longer_than: int = 0) -> list[_Worker]:
        """The workers of `model` with a free slot (and, given `longer_than`, a longer context than that)."""
        return [
            w
            for w in self._by_model.get(model, ())
            if len(w.inflight) < w.announcement.capacity and w.worker_id != exclude and _takes(w, longer_than)
        ]

    def _dispatch(self, request: _Request, exclude: bytes | None = None) -> bool:
        """Sends the request to a worker with a free slot (and context enough); False if there is none."""
        workers = self._free_workers(request.model, exclude, request.exceeds_context)
        while workers:
            candidates = [
                Candidate(w.worker_id, len(w.inflight), w.announcement.capacity, w.announcement.request_tokens_per_s)
                for w in workers
            ]
            worker = workers.pop(self._policy(candidates, self._dispatch_state))
            if self._to_worker(worker.worker_id, request.submit_frames):
                worker.inflight.add(request.request_id)
                request.worker = worker.worker_id
                request.attempts += 1
                return True
        return False

    def _to_worker(self, worker_id: bytes, frames: list[bytes]) -> bool:
        try:
            transport.send_nowait(self.back, [worker_id, *frames])
            return True
        except _ROUTING_ERRORS:
            return False  # not connected yet, or not reading: the heartbeat decides its fate

    def _serve_queue(self, model: str) -> None:
        """Sends waiting requests to free workers, in order. One that waits for a longer context than any
        free worker has lets those behind it go first; one that no worker left can take gets its refusal."""
        queue = self._queues.get(model)
        position = 0
        while queue is not None and position < len(queue):
            request = queue[position]
            if not self._context_available(request):
                del queue[position]
                del self._requests[request.request_id]
                assert request.refusal is not None
                self._tell(request.client, request.refusal)
            elif self._dispatch(request):
                del queue[position]
            elif request.exceeds_context and self._free_workers(model):
                position += 1
            else:
                return

    def _context_available(self, request: _Request) -> bool:
        """Whether a worker of the request's model, free or busy, has the context it needs."""
        need = request.exceeds_context
        return not need or any(_takes(w, need) for w in self._by_model.get(request.model, ()))

    def _finish(self, request: _Request) -> None:
        """Forgets a request and frees its worker's slot."""
        del self._requests[request.request_id]
        worker = self._workers.get(request.worker) if request.worker else None
        if worker is not None:
            worker.inflight.discard(request.request_id)
            for model in worker.announcement.models:
                self._serve_queue(model)

    # ------------------------------------------------------------------ workers

    def _on_worker(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise ProtocolError(f"{len(frames)} frames from a worker")
        worker_id, header = frames[0], frames[1]
        # Hot path: a token frame is forwarded after a dictionary look-up.
        if header[:2] == _HEADER_TOKENS and len(frames) == 3 and len(header) == 2 + REQUEST_ID_SIZE:
            request = self._requests.get(header[2:])
            if request is not None and request.worker == worker_id:
                request.started = True
                if not self._reply(request.client, frames[1:]):
                    self._abandon(request)
                return
            self._stale(worker_id, header[2:])
            return
        kind, request_id = parse_header(header)
        worker = self._workers.get(worker_id)
        if kind is Kind.BYE:
            if worker is not None:
                self._departed[worker_id] = (worker.announcement.started_at, time.monotonic())
                self._bury(worker, "it left")
            return
        if kind not in (Kind.TOKENS, Kind.DONE, Kind.ERROR) or len(frames) != 3:
            raise ProtocolError(f"{kind.name} with {len(frames)} frames from a worker")
        request = self._requests.get(request_id)
        if request is None or request.worker != worker_id:
            self._stale(worker_id, request_id)
            return
        if kind is Kind.TOKENS:
            request.started = True
        elif kind is Kind.ERROR:
            try:
                reply = decode(frames[2], ErrorReply)
            except ProtocolError as exc:
                # The worker is done with the request either way: it ends with an error the client can read,
                # rather than waiting forever and holding the worker's slot.
                self._drop("malformed", exc)
                message = f"the worker's error reply could not be read: {exc}"
                self._tell(request.client, error_frames(request_id, ErrorCode.INTERNAL, message))
                self._finish(request)
                return
            if reply.code is ErrorCode.WORKER_UNAVAILABLE and not request.started:
                self._redirect(request, worker)
                return
            if reply.code is ErrorCode.WORKER_LOST and not request.started:
                self._retry(request, worker)  # a worker that gave up on it (a drain that ran out of time)
                return
            too_long = reply.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and not request.started
            if too_long and worker is not None and self._move_to_longer_context(request, worker, frames[1:]):
                return
        if kind is not Kind.TOKENS:
            self._tell(request.client, frames[1:])  # its last frame: the worker is done with it either way
            self._finish(request)
        elif not self._reply(request.client, frames[1:]):
            self._abandon(request)

    def _stale(self, worker_id: bytes, request_id: bytes) -> None:
        """A frame for a request this broker does not know (or gave to another worker): stop it."""
        if request_id:
            self.dropped["stale"] += 1
            self._to_worker(worker_id, [pack_header(Kind.CANCEL, request_id)])

    def _abandon(self, request: _Request) -> None:
        """The client is gone or not reading: cancel its request on the worker, and tell the
        client when it reads again (a client that is gone is forgotten at the next tick)."""
        self.dropped["client_gone"] += 1
        if request.worker is not None:
            self._to_worker(request.worker, [pack_header(Kind.CANCEL, request.request_id)])  # before _finish()
        self._finish(request)
        message = "the broker dropped the request: its client stopped reading (its connection was full)"
        self._tell(request.client, error_frames(request.request_id, ErrorCode.CANCELLED, message))

    def _redirect(self, request: _Request, refused_by: _Worker | None) -> None:
        """A worker refused the request (draining, or full by its own count): another worker
        takes it, or it waits at the head of the queue. A refusal is not a lost attempt."""
        if refused_by is not None:
            refused_by.inflight.discard(request.request_id)
        request.worker = None
        request.attempts -= 1
        exclude = refused_by.worker_id if refused_by is not None else None
        if not self._dispatch(request, exclude=exclude):
            self._enqueue(request, front=True)

    def _move_to_longer_context(self, request: _Request, refused_by: _Worker, refusal: list[bytes]) -> bool:
        """A worker found the request too long for its context (workers of one model may differ: see
        `mesh worker --max-model-len`). A worker of the model with a longer context takes it: now, or when
        one has a free slot (the request waits at the head of the queue). With no such worker, the refusal
        stands and is the client's answer; it is kept for the client should every longer worker leave
        while the request waits. Each move goes to a strictly longer context, so it ends."""
        context = refused_by.announcement.context_length
        if not context:
            return False
        request.exceeds_context = max(request.exceeds_context, context)
        if not self._context_available(request):
            return False
        refused_by.inflight.discard(request.request_id)
        request.worker = None
        request.attempts -= 1  # a refusal is not a lost attempt
        request.refusal = refusal
        if not self._dispatch(request):
            self._enqueue(request, front=True)
        for model in refused_by.announcement.models:
            self._serve_queue(model)
        return True

    def _retry(self, request: _Request, worker: _Worker | None) -> None:
        """Sends an unstarted request elsewhere, or reports it lost after max_attempts."""
        if worker is not None:
            worker.inflight.discard(request.request_id)
        request.worker = None
        if request.attempts >= self.config.max_attempts or not self._by_model.get(request.model):
            del self._requests[request.request_id]
            message = f"the worker serving {request.model!r} was lost before it answered"
            self._tell(request.client, error_frames(request.request_id, ErrorCode.WORKER_LOST, message))
        elif not self._dispatch(request):
            self._enqueue(request, front=True)

    def _bury(self, worker: _Worker, reason: str, successor: _Worker | None = None) -> None:
        if successor is None:
            del self._workers[worker.worker_id]
        else:
            self._workers[worker.worker_id] = successor
        self._index_models()
        log.warning("worker %s is gone: %s", worker.worker_id.decode(errors="replace"), reason)
        for request_id in list(worker.inflight):
            request = self._requests[request_id]
            if request.started:
                del self._requests[request_id]
                message = f"the worker serving {request.model!r} was lost mid-stream ({reason})"
                self._tell(request.client, error_frames(request_id, ErrorCode.WORKER_LOST, message))
            else:
                self._retry(request, None)
        worker.inflight.clear()
        # Queued requests for a model nobody serves any more will never run; those that wait for a
        # context only this worker had get their refusal.
        for model in worker.announcement.models:
            if self._by_model.get(model):
                self._serve_queue(model)
            else:
                for request in self._queues.pop(model, ()):
                    del self._requests[request.request_id]
                    message = f"model {request.model!r} is no longer served by any worker"
                    self._tell(request.client, error_frames(request.request_id, ErrorCode.WORKER_LOST, message))
        gone = WorkerGone(worker.worker_id.decode(errors="replace"), reason)
        self._publish([pack_header(Kind.WORKER_GONE), encode(gone)])

    def _index_models(self) -> None:
        by_model: dict[str, list[_Worker]] = {}
        for worker in self._workers.values():
            for model in worker.announcement.models:
                by_model.setdefault(model, []).append(worker)
        self._by_model = by_model

    # ------------------------------------------------------------------ bus

    def _on_bus_in(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            raise ProtocolError(f"{len(frames)} frames on the bus")
        kind, _ = parse_header(frames[0])
        if kind is not Kind.ANNOUNCE:
            raise ProtocolError(f"{kind.name} published by a worker")
        announcement = decode(frames[1], Announcement)
        if not announcement.worker_id or announcement.capacity < 1 or not announcement.models:
            raise ProtocolError(f"announcement without id, capacity or models: {announcement}")
        for speed in (announcement.tokens_per_s, announcement.request_tokens_per_s):
            if not (math.isfinite(speed) and speed >= 0):
                raise ProtocolError(f"announcement with a speed of {speed} tokens/s")
        self._learn(announcement, frames)
        self._publish(frames)

    def _learn(self, announcement: Announcement, frames: list[bytes]) -> None:
        worker_id = announcement.worker_id.encode()
        departed = self._departed.get(worker_id)
        if departed is not None and departed[0] == announcement.started_at:
            return  # a late announcement from a worker that has said BYE
        self._departed.pop(worker_id, None)
        now = time.monotonic()
        worker = self._workers.get(worker_id)
        if worker is None and announcement.draining:
            return  # a draining worker takes no new work: no need to learn it
        if worker is not None and announcement.started_at < worker.announcement.started_at:
            # An older incarnation than the one in place: two live processes share a --worker-id (or a
            # clock went back). Taking turns would bury each at every heartbeat: the newer one serves.
            self.dropped["older_incarnation"] += 1
            if _log_due(self._duplicate_logged, worker_id):
                log.warning(
                    "two workers announce the id %s (started at %.3f and %.3f): the newer one serves; "
                    "give each worker its own --worker-id",
                    announcement.worker_id,
                    announcement.started_at,
                    worker.announcement.started_at,
                )
            return
        if worker is not None and worker.announcement.started_at != announcement.started_at:
            # A new incarnation (a restart, or a worker whose connection dropped): the old one's work
            # is gone. The new one takes its place first, so that its requests can be retried on it.
            successor = _Worker(worker_id, announcement, frames, now)
            self._bury(worker, "it restarted or reconnected", successor)
            log.info("worker %s is back serving %s", announcement.worker_id, ", ".join(announcement.models))
        elif worker is None:
            worker = self._workers[worker_id] = _Worker(worker_id, announcement, frames, now)
            self._index_models()
            log.info("worker %s joined serving %s", announcement.worker_id, ", ".join(announcement.models))
        else:
            models_changed = worker.announcement.models != announcement.models
            worker.announcement, worker.announcement_frames, worker.last_seen = announcement, frames, now
            if models_changed:
                self._index_models()
        for model in announcement.models:
            self._serve_queue(model)

    def _on_subscription(self, frames: list[bytes]) -> None:
        # XPUB delivers b"\x01<topic>" for each subscription: a snapshot is due (sent from _tick).
        if frames and frames[0][:1] == b"\x01":
            self._snapshot_due = True

    def _publish_snapshot(self, now: float) -> None:
        """Every live worker's announcement, then a snapshot beacon. XPUB cannot answer one subscriber
        alone, so each snapshot goes to every subscriber: at most one per SNAPSHOT_MIN_INTERVAL_S, so that
        subscribers joining together (every one at once, after a key is revoked) share a few."""
        self._snapshot_due = False
        self._next_snapshot = now + SNAPSHOT_MIN_INTERVAL_S
        for worker in self._workers.values():
            self._publish(worker.announcement_frames)
        self._publish(self._beacon_frames(snapshot=True))

    def _publish(self, frames: list[bytes]) -> None:
        try:
            transport.send_nowait(self.bus_out, frames)
        except zmq.Again:
            self.dropped["bus_full"] += 1

    def _beacon_frames(self, snapshot: bool = False) -> list[bytes]:
        info = BrokerInfo(
            version=__version__,
            endpoints=self.endpoints.as_dict(),
            dispatch_method=self.config.dispatch_method,
            pid=os.getpid(),
            started_at=self.started_at,
            workers=len(self._workers),
            queued=sum(len(q) for q in self._queues.values()),
            inflight=len(self._requests),
            dropped=dict(self.dropped),
            snapshot=snapshot,
        )
        return [pack_header(Kind.BEACON), encode(info)]

    # ------------------------------------------------------------------ timers

    def _tick(self, now: float) -> None:
        if self._warm_until and now >= self._warm_until:
            self._warm_until = 0.0
            for model in [m for m in self._queues if not self._by_model.get(m)]:
                for request in self._queues.pop(model):
                    del self._requests[request.request_id]
                    self._tell(request.client, self._not_found(request.request_id, model))
        for worker in [w for w in self._workers.values() if now - w.last_seen > self._expiry]:
            self._bury(worker, f"no heartbeat for {now - worker.last_seen:.1f} s")
        if self._snapshot_due and now >= self._next_snapshot:
            self._publish_snapshot(now)
        if self._owed:
            self._pay_owed()
        if now >= self._next_forget:
            self._forget_old_entries(now)
        if now >= self._next_beacon:
            self._next_beacon = now + self.config.heartbeat_interval
            self._publish(self._beacon_frames())
        if self._gatekeeper is not None:
            self._shut_out_revoked_listeners()

    def _forget_old_entries(self, now: float) -> None:
        """Bounds the tables that gain an entry per departed worker or refused peer: a broker that runs
        for months through rolling restarts (each worker a new id) must not grow with them."""
        self._next_forget = now + DEPARTED_KEEP_S
        for worker_id, (_, left_at) in list(self._departed.items()):
            if now - left_at > DEPARTED_KEEP_S:
                del self._departed[worker_id]
        for table in (self._duplicate_logged, self._revoked_logged):
            for key, logged_at in list(table.items()):
                if now - logged_at >= REFUSAL_LOG_INTERVAL:  # _log_due would log it again anyway
                    del table[key]

    def _shut_out_revoked_listeners(self) -> None:
        """After a key leaves allow/clients, drops every bus subscriber so that each passes ZAP again.

        ZAP checks a peer once, at its handshake, and a subscriber never sends anything else the
        broker could refuse. Re-binding the bus endpoint closes every connection made to it; each
        subscriber reconnects (within its reconnect interval) and re-subscribes, and gets a fresh
        snapshot; a revoked one is refused at the handshake.
        """
        assert self._gatekeeper is not None
        revocations = self._gatekeeper.revocations("clients")
        if revocations != self._client_revocations:
            self._client_revocations = revocations
            self.bus_out.unbind(self._bus_out_bound)
            self._bus_out_unbound = True
            log.info("a client key was revoked: every bus subscriber reconnects and passes the allow-list again")
        if self._bus_out_unbound:
            try:
                self.bus_out.bind(self._bus_out_bound)
            except zmq.ZMQError as exc:  # the old listener still closing: try again next tick
                log.debug("bus endpoint not free again yet: %s", exc)
                return
            self._bus_out_unbound = False
