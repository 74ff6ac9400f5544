"""The worker runtime: one engine behind a DEALER to the broker and a PUB on the bus.

It runs each request the broker sends as a task that streams the engine's
steps back (one frame per step, at most one per stream interval: see
mesh.reply_stream), enforces the capacity, announces its load
on the bus (on every change, rate-limited, and every heartbeat), and drains
on SIGTERM: it stops taking work, lets in-flight requests finish within the
drain timeout, then cancels the rest.

A broker restart needs no special handling: ZeroMQ reconnects both sockets,
the next heartbeat announces the worker to the new broker, and frames for
requests the new broker never sent are answered with a CANCEL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import zmq

from mesh import __version__, transport
from mesh.discovery import HEARTBEAT_INTERVAL
from mesh.endpoints import DEFAULT_BROKER_URL, Endpoints
from mesh.engines import Engine, EngineConfig, EngineError
from mesh.heap import freeze_startup_objects
from mesh.protocol import (
    REQUEST_ID_SIZE,
    Announcement,
    ErrorCode,
    GenerateRequest,
    Kind,
    ProtocolError,
    decode,
    encode,
    error_frames,
    offset_seed,
    pack_header,
    parse_header,
)
from mesh.reply_stream import DEFAULT_STREAM_INTERVAL, ReplyStream
from mesh.security import SecurityConfig

log = logging.getLogger("mesh.worker")

#: Shortest gap between two load announcements (heartbeats aside).
LOAD_ANNOUNCE_MIN_INTERVAL = 0.05
#: Window over which tokens/s is measured.
SPEED_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    broker_url: str = DEFAULT_BROKER_URL
    engine: EngineConfig = field(default_factory=EngineConfig)
    worker_id: str = ""
    drain_timeout: float = 30.0
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    #: Shortest gap between two frames of one request (mesh.reply_stream); 0 sends every step at once.
    stream_interval: float = DEFAULT_STREAM_INTERVAL
    security: SecurityConfig = field(default_factory=SecurityConfig)


class SpeedMeter:
    """A worker's two speeds over the last SPEED_WINDOW_S.

    - `throughput`: tokens per second of wall time, all requests together: what the worker is producing
      (a load figure; 0 once idle for a window).
    - `per_request`: the pace of one request once it streams: its tokens after the first, over the time
      since its first, summed over requests (tokens per second of streaming time). Idle time, queueing,
      prefill and the worker's share of the traffic stay out of it (a worker that served one request in
      the window is not slower for it, and a busy one does not look faster for being busy), so dispatch
      can compare workers by it. It keeps its last value until the window holds enough streaming to say
      again, and is 0 until first measured.
    """

    #: Least streaming time (request-seconds) and paced tokens in the window for a new per-request figure.
    MIN_STREAMING_S = 0.5
    MIN_PACED_TOKENS = 8

    def __init__(self, now: float, window: float = SPEED_WINDOW_S) -> None:
        self._window = window
        self._started = now
        #: (when, tokens then, of them tokens after their request's first, streaming-seconds since the sample before)
        self._samples: deque[tuple[float, int, int, float]] = deque()
        self._tokens = 0  # sums over _samples
        self._paced = 0
        self._streaming_s = 0.0
        self._streaming = 0  # requests that have had their first token and not ended
        self._since = now
        self._per_request = 0.0

    def _sample(self, now: float, tokens: int, paced: int) -> None:
        streaming_s = self._streaming * max(now - self._since, 0.0)
        self._since = now
        self._samples.append((now, tokens, paced, streaming_s))
        self._tokens += tokens
        self._paced += paced
        self._streaming_s += streaming_s

    def add(self, tokens: int, now: float, *, first: bool = False) -> None:
        """`tokens` more of one request at `now`; `first`: they include that request's first token, which
        starts its streaming time (what came before it was queueing and prefill, not pace)."""
        self._sample(now, tokens, tokens - 1 if first else tokens)
        if first:
            self._streaming += 1

    def ended(self, now: float) -> None:
        """A request that had streamed (add(..., first=True)) ended at `now`."""
        self._sample(now, 0, 0)
        self._streaming -= 1
        self._measure()

    def _measure(self) -> None:
        if self._streaming_s >= self.MIN_STREAMING_S and self._paced >= self.MIN_PACED_TOKENS:
            self._per_request = self._paced / self._streaming_s

    def rates(self, now: float) -> tuple[float, float]:
        """(throughput, per_request) in tokens per second."""
        self._sample(now, 0, 0)
        samples = self._samples
        while now - samples[0][0] > self._window:  # the sample just taken stays
            _, tokens, paced, streaming_s = samples.popleft()
            self._tokens -= tokens
            self._paced -= paced
            self._streaming_s -= streaming_s
        self._measure()
        return self._tokens / max(min(self._window, now - self._started), 1.0), self._per_request


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.endpoints = Endpoints.from_url(config.broker_url)
        self._active: dict[bytes, asyncio.Task[None]] = {}
        #: Cancelled requests still unwinding: no longer counted as load (the broker has
        #: already freed their slots), but awaited before the worker exits.
        self._cancelled: set[asyncio.Task[None]] = set()
        self._draining = False
        self._stopping = asyncio.Event()
        self._load_changed = asyncio.Event()
        self._speed = SpeedMeter(time.monotonic())
        self._seq = 0
        self._runs = itertools.count()
        self._started_at = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        #: Send tasks of closed back sockets, cancelled: awaited before the worker exits.
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Starts the engine, serves until stop() (or SIGTERM), then drains and closes."""
        await self.engine.start()
        frozen = freeze_startup_objects()
        log.debug("%d start-up objects exempted from garbage collection", frozen)
        self._models = self.engine.model_names
        self._context = ctx = zmq.Context()
        self._connect_back()
        self._bus = transport.connect(ctx, zmq.PUB, self.endpoints.bus_in, self.config.security)  # never waits
        self._tasks = [asyncio.create_task(self._announce_loop(), name="worker-announce")]
        log.info("worker %s serving %s (%s)", self.worker_id, ", ".join(self._models), self.engine.backend)
        try:
            await self._stopping.wait()
            await self._drain()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._close_back()
            await asyncio.gather(*self._closing, return_exceptions=True)
            self._bus.close(linger=0)
            ctx.term()
            await self.engine.stop()

    def _connect_back(self) -> None:
        back = transport.connect(
            self._context, zmq.DEALER, self.endpoints.back, self.config.security, self.worker_id.encode()
        )
        self._back = transport.AsyncChannel(back, self._on_message)
        self._back_watch = transport.ConnectionWatch(back, self._on_connection_lost)

    def _close_back(self) -> None:
        """Closes the back socket at once (it must not redial); what is left to await is kept."""
        self._back_watch.close()
        flusher = self._back.close_now()
        if flusher is not None:
            self._closing.add(flusher)
            flusher.add_done_callback(self._closing.discard)

    def stop(self) -> None:
        """Begins a graceful stop: no new work, in-flight work drains."""
        self._stopping.set()

    async def _drain(self) -> None:
        self._draining = True
        self._publish_announcement()  # the broker stops dispatching here
        if self._active:
            log.info("draining %d request(s) for up to %.0f s", len(self._active), self.config.drain_timeout)
            await asyncio.wait(list(self._active.values()), timeout=self.config.drain_timeout)
        for request_id, task in list(self._active.items()):
            task.cancel()
            self._back.send(error_frames(request_id, ErrorCode.WORKER_LOST, "the worker shut down", self.worker_id))
        await asyncio.gather(*self._active.values(), *self._cancelled, return_exceptions=True)
        self._back.send([pack_header(Kind.BYE)])
        # Give the last frames a moment to leave before the sockets close.
        deadline = time.monotonic() + 1.0
        while self._back.backlog and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ requests

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            self._handle(frames)
        except ProtocolError as exc:
            log.warning("dropped a message from the broker: %s", exc)

    def _handle(self, frames: list[bytes]) -> None:
        kind, request_id = parse_header(frames[0])
        if len(request_id) != REQUEST_ID_SIZE:
            raise ProtocolError(f"{kind.name} without a request id")
        if kind is Kind.CANCEL:
            # Forget it at once: the broker freed the slot when it sent this, and may
            # already be sending the next request.
            self._forget(request_id)
            return
        if kind is not Kind.SUBMIT or len(frames) != 3:
            raise ProtocolError(f"{kind.name} with {len(frames)} frames")
        if request_id in self._active:
            return  # a duplicate delivery; the first one is being served
        try:
            request = decode(frames[2], GenerateRequest)
        except ProtocolError as exc:
            self._back.send(error_frames(request_id, ErrorCode.BAD_REQUEST, str(exc), self.worker_id))
            return
        if request.resume_token_ids and not self.engine.supports_resume:
            message = f"the {self.engine.backend} backend cannot continue a migrated request"
            self._back.send(error_frames(request_id, ErrorCode.BAD_REQUEST, message, self.worker_id))
            return
        if self._draining or len(self._active) >= self.engine.config.capacity:
            reason = "draining" if self._draining else "full"
            self._back.send(error_frames(request_id, ErrorCode.WORKER_UNAVAILABLE, reason, self.worker_id))
            return
        if request.seed is None and self.engine.config.seed is not None:
            request.seed = offset_seed(self.engine.config.seed, request.choice_index)
        task = asyncio.get_running_loop().create_task(self._serve(request_id, request))
        self._active[request_id] = task
        self._load_changed.set()

    def _forget(self, request_id: bytes) -> None:
        """Cancels a request; it no longer counts as load, but is awaited before the worker exits."""
        task = self._active.pop(request_id, None)
        if task is not None:
            task.cancel()
            self._cancelled.add(task)
            task.add_done_callback(self._cancelled.discard)
            self._load_changed.set()

    def _on_connection_lost(self) -> None:
        """The connection to the broker dropped. ZeroMQ redials, but frames that were on their way
        either side are lost, and neither end can tell which: a SUBMIT never seen here, a token
        missing from a stream. So the worker starts afresh, as a restarted worker would: it drops
        its requests and announces a new incarnation, and the broker, hearing it, sends requests
        that had no token yet elsewhere and tells the clients of the others, which migrate them."""
        log.warning("the connection to the broker dropped: %d request(s) handed back", len(self._active))
        for request_id in list(self._active):
            self._forget(request_id)
        # A new socket (the broker hands the identity over to it): frames of the old incarnation still
        # queued on the old one go with it, and cannot reach the broker after it has moved their
        # requests on.
        self._close_back()
        self._connect_back()
        self._started_at = time.time()
        self._load_changed.set()  # announce the new incarnation now

    async def _serve(self, request_id: bytes, request: GenerateRequest) -> None:
        streaming = False

        def count_tokens(count: int) -> None:
            nonlocal streaming
            if count:
                self._speed.add(count, time.monotonic(), first=not streaming)
                streaming = True

        reply = ReplyStream(self._back.send, request_id, self.config.stream_interval, count_tokens)
        # The engine's id for this run: unique, because the same request may come back to this process
        # (after a dropped connection) while this run's cancellation still unwinds.
        engine_id = f"{request_id.hex()}-{next(self._runs)}"
        try:
            # Closed on every way out, so a reply refused here frees the request's slot at once.
            async with contextlib.aclosing(self.engine.generate(request, engine_id)) as outputs:
                async for output in outputs:
                    if output.finish_reason is not None:
                        reply.finish(output, self.worker_id)
                        break
                    reply.add(output)
        except asyncio.CancelledError:
            await self.engine.abort(engine_id)
            raise
        except EngineError as exc:
            reply.fail(error_frames(request_id, exc.code, exc.message, self.worker_id))
        except Exception as exc:
            log.exception("request %s failed", request_id.hex())
            reply.fail(error_frames(request_id, ErrorCode.INTERNAL, f"engine failure: {exc}", self.worker_id))
        finally:
            reply.discard()
            if streaming:
                self._speed.ended(time.monotonic())
            if self._active.get(request_id) is asyncio.current_task():  # not a later run of the same id
                del self._active[request_id]
            self._load_changed.set()

    # ------------------------------------------------------------------ announcements

    async def _announce_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            self._publish_announcement()
            self._load_changed.clear()
            try:
                await asyncio.wait_for(self._load_changed.wait(), interval)
                await asyncio.sleep(LOAD_ANNOUNCE_MIN_INTERVAL)  # rate limit: coalesce bursts of changes
            except TimeoutError:
                pass

    def _publish_announcement(self) -> None:
        self._seq += 1
        stats = self.engine.stats()
        throughput, per_request = self._speed.rates(time.monotonic())
        announcement = Announcement(
            worker_id=self.worker_id,
            models=self._models,
            backend=self.engine.backend,
            capacity=self.engine.config.capacity,
            inflight=len(self._active),
            waiting=stats.waiting,
            tokens_per_s=round(throughput, 1),
            request_tokens_per_s=round(per_request, 1),
            context_length=self.engine.context_length,
            version=__version__,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            seq=self._seq,
            draining=self._draining,
        )
        with contextlib.suppress(zmq.Again):  # a full queue: the next heartbeat will do
            self._bus.send_multipart([pack_header(Kind.ANNOUNCE), encode(announcement)], zmq.NOBLOCK)
