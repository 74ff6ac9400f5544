"""The asyncio client: one connection to the broker, shared by many concurrent requests.

    async with MeshClient("tcp://127.0.0.1:21001") as client:
        async for chunk in client.generate(GenerateRequest(model="smollm2-135m-instruct", prompt="Hi")):
            print(chunk.text, end="")

generate() yields deltas as the broker streams them (a reader that falls behind
takes everything already waiting as one delta, not a backlog of tiny ones) and raises a MeshError
subclass (mesh.errors) for a protocol error code, a timeout, or a broker that
went away. Cancelling the task that consumes it, or leaving the loop early,
cancels the request down to the engine. The client also listens to the
discovery bus, so workers() and models() are a live view with no round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import msgspec
import zmq

from mesh import transport
from mesh.discovery import MeshView, expiry_after
from mesh.endpoints import DEFAULT_BROKER_URL, Endpoints
from mesh.errors import (
    BadRequestError,
    BrokerUnavailableError,
    EngineFailureError,
    MeshError,
    MeshTimeoutError,
    RequestError,
    WorkerLostError,
    error_for_code,
)
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    Announcement,
    BrokerInfo,
    Done,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    Kind,
    ProtocolError,
    TokenChunk,
    TokenLogprob,
    WorkerGone,
    decode,
    encode,
    new_request_id,
    pack_header,
    parse_header,
)
from mesh.security import SecurityConfig

log = logging.getLogger("mesh.client")

#: Bytes of replies one request may have waiting unread before it is cancelled as too slow a
#: reader. Counted in bytes, not frames: one frame of logprobs can outweigh thousands of tokens.
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
#: Reply kinds that carry a delta and may be merged into the one before them.
_DELTA_KINDS = frozenset({Kind.TOKENS, Kind.DONE})
_TOKENS_HEADER = pack_header(Kind.TOKENS)
#: Times one request may move to another worker after losing its worker mid-stream.
MAX_MIGRATIONS = 2


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Chunk:
    """A delta of one request; the last one has finish_reason, usage and worker_id set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    worker_id: str | None = None


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    worker_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class _ConnectionDropped(WorkerLostError):
    """The connection to the broker dropped with the request open: frames may have been lost
    either way, so the request moves on (a new id), unstarted or not."""


class _FramesLost(_ConnectionDropped):
    """A frame of the request arrived with a number missing before it: frames were lost on the way
    (a connection that dropped and was redialled), so the request moves on from the tokens before."""


class _LostMidStream(Exception):
    """Internal: the broker reported the request's worker lost; generate() may migrate it."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


class _Stream:
    """Frames (or a failure) for one request, in arrival order.

    Leaner than an asyncio.Queue: a frame that is already waiting is taken
    without suspending, and a waiting reader costs one future.
    """

    __slots__ = ("answered", "buffered_bytes", "items", "next_seq", "submit_frames", "waiter")

    def __init__(self, submit_frames: list[bytes]) -> None:
        self.items: deque[list[bytes] | MeshError] = deque()
        self.buffered_bytes = 0
        self.waiter: asyncio.Future[None] | None = None
        self.submit_frames = submit_frames  # kept to re-submit to a restarted broker
        self.answered = False
        self.next_seq = 1  # the number the next TOKENS or DONE frame must carry

    def check_seq(self, seq: int) -> bool:
        """Whether a frame numbered `seq` is the next one (0: not numbered, taken as it comes)."""
        if seq and seq != self.next_seq:
            return False
        self.next_seq += 1 if seq else 0
        return True

    def put(self, item: list[bytes] | MeshError) -> None:
        self.items.append(item)
        if not isinstance(item, MeshError):
            self.buffered_bytes += _size(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[bytes] | MeshError:
        """The oldest waiting item; there must be one."""
        item = self.items.popleft()
        if not isinstance(item, MeshError):
            self.buffered_bytes -= _size(item)
        return item

    async def get(self) -> list[bytes] | MeshError:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.take()


def _size(frames: list[bytes]) -> int:
    return sum(map(len, frames))


class MeshClient:
    def __init__(
        self,
        broker_url: str = DEFAULT_BROKER_URL,
        *,
        security: SecurityConfig | None = None,
        timeout: float | None = None,
        connect_timeout: float = 3.0,
        migrate: bool = True,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        """`timeout`: longest wait for any frame of a request (None: rely on liveness alone).
        `connect_timeout`: longest wait for a broker never heard from before a request fails.
        `migrate`: when a worker dies mid-stream, continue the request on another worker from the
        tokens already streamed (engines that cannot resume answer worker_lost as before).
        `max_buffered_bytes`: replies a request may have waiting unread; past it the request is
        cancelled on its worker and its reader gets a RequestError."""
        self.migrate = migrate
        self.max_buffered_bytes = max_buffered_bytes
        self.endpoints = Endpoints.from_url(broker_url)
        self.security = security or SecurityConfig()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.view = MeshView()
        self._expiry = expiry_after()
        self._streams: dict[bytes, _Stream] = {}
        self._broker_info: BrokerInfo | None = None
        self._broker_seen_at = 0.0
        self._broker_heard = asyncio.Event()
        self._snapshot_done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._context: zmq.Context | None = None

    async def __aenter__(self) -> MeshClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._context = ctx = zmq.Context()
        front = transport.connect(ctx, zmq.DEALER, self.endpoints.front, self.security)
        bus = transport.connect(ctx, zmq.SUB, self.endpoints.bus_out, self.security)
        bus.setsockopt(zmq.SUBSCRIBE, b"")
        self._front = transport.AsyncChannel(front, self._on_reply)
        self._front_watch = transport.ConnectionWatch(front, self._on_connection_lost)
        self._bus = transport.AsyncChannel(bus, self._on_bus_message)
        self._tasks = [asyncio.create_task(self._watch_broker(), name="mesh-client-broker-watch")]

    async def close(self) -> None:
        """Cancels every open request on the mesh (their readers get BrokerUnavailableError) and
        closes the sockets; a second call does nothing."""
        if self._context is None:
            return
        for request_id in list(self._streams):
            self._front.send([pack_header(Kind.CANCEL, request_id)])
        self._fail_all(BrokerUnavailableError("the mesh client was closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._front_watch.close()
        await self._front.close()
        await self._bus.close()
        self._context.term()
        self._context = None

    # ------------------------------------------------------------------ the mesh, as seen from the bus

    @property
    def broker_alive(self) -> bool:
        return self._broker_info is not None and time.monotonic() - self._broker_seen_at <= self._expiry

    @property
    def broker_info(self) -> BrokerInfo | None:
        return self._broker_info

    def workers(self) -> list[Announcement]:
        return self.view.workers(time.monotonic())

    def models(self) -> dict[str, list[Announcement]]:
        return self.view.models(time.monotonic())

    def serving(self, model: str) -> list[Announcement]:
        """The live workers of one model, from the bus view (no round trip)."""
        return self.view.serving(model, time.monotonic())

    async def wait_for_broker(self, timeout: float | None = None) -> BrokerInfo:
        """Waits for the broker's snapshot (every live worker, then a beacon)."""
        try:
            await asyncio.wait_for(self._snapshot_done.wait(), timeout or self.connect_timeout)
        except TimeoutError:
            raise BrokerUnavailableError(f"no broker answered at {self.endpoints.front}") from None
        assert self._broker_info is not None
        return self._broker_info

    async def wait_for_models(self, names: Iterable[str], timeout: float = 10.0) -> None:
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.models()):
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(wanted - set(self.models())))
                raise MeshTimeoutError(f"no worker serves {missing} after {timeout:.0f} s")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerateRequest, *, timeout: float | None = None) -> AsyncIterator[Chunk]:
        """Streams one request's deltas; the last chunk carries finish_reason and usage.

        If its worker dies mid-stream, the request continues on another worker from the tokens
        already streamed (GenerateRequest.resume_token_ids), at most MAX_MIGRATIONS times; the
        caller sees one uninterrupted stream. Otherwise it ends with WorkerLostError."""
        produced: list[int] = []
        shown_chars = 0  # of the produced tokens' text (the echo is not theirs)
        current = request
        migrations = 0
        yielded = False
        while True:
            try:
                # aclosing: a caller that stops early cancels the request at once, not at garbage collection.
                async with contextlib.aclosing(self._stream_once(current, timeout)) as stream:
                    async for chunk in stream:
                        produced.extend(chunk.token_ids)
                        if chunk.token_ids or chunk.finish_reason is not None:
                            shown_chars += len(chunk.text)  # a chunk with neither is the echo
                        yielded = True
                        yield chunk
                return
            except RequestError as exc:
                if not migrations or isinstance(exc, WorkerLostError):
                    raise
                # No other worker took it (none left, or an engine that cannot continue it).
                raise WorkerLostError(f"the request's worker was lost and it could not move: {exc.message}") from None
            except _LostMidStream as lost:
                remaining = request.max_tokens - len(produced)
                # Unstarted requests of a lost worker were retried by the broker already; those of a
                # dropped connection the broker may never have seen.
                movable = produced or yielded or isinstance(lost.error, _ConnectionDropped)
                if not self.migrate or not movable or remaining <= 0 or migrations >= MAX_MIGRATIONS:
                    raise lost.error from None
                migrations += 1
                log.info("request migrates after %d token(s): %s", len(produced), lost.error.message)
                current = msgspec.structs.replace(
                    request,
                    resume_token_ids=[*request.resume_token_ids, *produced],
                    resume_text_chars=(request.resume_text_chars or 0) + shown_chars,
                    max_tokens=remaining,
                    echo=request.echo and not yielded,
                )

    async def _stream_once(self, request: GenerateRequest, timeout: float | None) -> AsyncIterator[Chunk]:
        await self._ensure_broker()
        timeout = timeout if timeout is not None else self.timeout
        request_id = new_request_id()
        body = encode(request)
        if len(body) > MAX_MESSAGE_BYTES:
            # The broker would drop this connection for it, and every other request on it with it.
            raise BadRequestError(
                f"the request is {len(body):,} bytes encoded, more than the mesh's message limit of "
                f"{MAX_MESSAGE_BYTES:,}: send a shorter prompt"
            )
        submit_frames = [pack_header(Kind.SUBMIT, request_id), request.model.encode(), body]
        stream = self._streams[request_id] = _Stream(submit_frames)
        self._front.send(submit_frames)
        finished = False
        try:
            while True:
                if stream.items:
                    item = stream.take()
                elif timeout is None:
                    item = await stream.get()
                else:
                    try:
                        async with asyncio.timeout(timeout):
                            item = await stream.get()
                    except TimeoutError:
                        raise MeshTimeoutError(f"no answer from the mesh for {timeout} s") from None
                if isinstance(item, MeshError):
                    finished = True  # the request is gone on the mesh side already
                    if isinstance(item, WorkerLostError):
                        raise _LostMidStream(item)
                    raise item
                try:
                    chunk, seq = self._chunk(item)
                    if not stream.check_seq(seq):
                        # Not finished: the request may still run on its worker, and is cancelled below.
                        raise _LostMidStream(_FramesLost(f"frames of the request were lost before frame {seq}"))
                    if stream.items and chunk.finish_reason is None:
                        chunk = self._merge_waiting(chunk, stream)
                except WorkerLostError as exc:
                    finished = True
                    raise _LostMidStream(exc) from None
                except ProtocolError as exc:
                    # A frame this client cannot read (a process from another release?): the request may
                    # still be running, so it is cancelled, and the caller gets a MeshError, not a ValueError.
                    finished = True
                    self._front.send([pack_header(Kind.CANCEL, request_id)])
                    raise EngineFailureError(f"a reply from the mesh could not be read: {exc}") from None
                if chunk.finish_reason is not None:
                    finished = True
                    yield chunk
                    return
                yield chunk
        except RequestError:
            finished = True
            raise
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._context is not None:
                self._front.send([pack_header(Kind.CANCEL, request_id)])

    async def complete(self, request: GenerateRequest, *, timeout: float | None = None) -> Completion:
        """Runs one request to its end and returns the whole text."""
        texts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        async for chunk in self.generate(request, timeout=timeout):
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs or ())
            if chunk.finish_reason is not None:
                assert chunk.usage is not None and chunk.worker_id is not None
                text = "".join(texts)
                return Completion(text, token_ids, chunk.finish_reason, chunk.usage, chunk.worker_id, logprobs)
        raise AssertionError("a stream ended without a finish reason")

    @classmethod
    def _merge_waiting(cls, chunk: Chunk, stream: _Stream) -> Chunk:
        """Folds the token frames already waiting behind `chunk` into it (up to and including DONE).

        A reader slower than its worker then takes one delta instead of a backlog of tiny ones:
        one SSE event and one write instead of many. An error stays queued for the next read.
        """
        if not chunk.token_ids:
            return chunk  # the echo stays a chunk of its own: its text is the prompt's, not the tokens'
        texts = [chunk.text]
        token_ids = list(chunk.token_ids)
        logprobs = list(chunk.logprobs) if chunk.logprobs else None
        merged = chunk
        while stream.items:
            frames = stream.items[0]
            if isinstance(frames, MeshError) or parse_header(frames[0])[0] not in _DELTA_KINDS:
                break
            merged_next, seq = cls._chunk(frames)
            if not stream.check_seq(seq):
                break  # left waiting: the next read reports the gap
            stream.take()
            merged = merged_next
            texts.append(merged.text)
            token_ids.extend(merged.token_ids)
            if merged.logprobs:
                logprobs = (logprobs or []) + merged.logprobs
            if merged.finish_reason is not None:
                break
        if merged is chunk:
            return chunk
        return Chunk("".join(texts), token_ids, logprobs, merged.finish_reason, merged.usage, merged.worker_id)

    @staticmethod
    def _chunk(frames: list[bytes]) -> tuple[Chunk, int]:
        """A TOKENS or DONE frame as a Chunk, with its number (TokenChunk.seq); raises for an ERROR."""
        kind, _ = parse_header(frames[0])
        if kind is Kind.TOKENS:
            tokens = decode(frames[1], TokenChunk)
            return Chunk(tokens.text, tokens.token_ids, tokens.logprobs), tokens.seq
        if kind is Kind.DONE:
            done = decode(frames[1], Done)
            usage = Usage(done.prompt_tokens, done.completion_tokens)
            chunk = Chunk(done.text, done.token_ids, done.logprobs, done.finish_reason, usage, done.worker_id)
            return chunk, done.seq
        if kind is Kind.ERROR:
            reply = decode(frames[1], ErrorReply)
            raise error_for_code(reply.code, reply.message)
        raise ProtocolError(f"{kind.name} in a reply stream")

    async def _ensure_broker(self) -> None:
        if self.broker_alive:
            return
        if self._broker_info is not None:
            raise BrokerUnavailableError(f"the broker at {self.endpoints.front} stopped answering")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._broker_heard.wait(), self.connect_timeout)
        if not self.broker_alive:
            raise BrokerUnavailableError(f"no broker answered at {self.endpoints.front}")

    def _broker_restarted(self) -> None:
        """A new broker: requests still unanswered are submitted again (the new broker ignores
        one it already has from us); those that had begun streaming died with the old one."""
        lost = error_for_code(ErrorCode.WORKER_LOST, "the broker restarted")
        for request_id, stream in list(self._streams.items()):
            if stream.answered:
                stream.put(lost)
                del self._streams[request_id]
            else:
                self._front.send(stream.submit_frames)

    def _on_connection_lost(self) -> None:
        """The connection to the broker dropped (ZeroMQ redials, under a new identity at the broker):
        frames that were on their way are lost, and replies to this connection's requests can no
        longer reach it. Every open request moves on under a new id (generate() migrates it from
        the tokens it has); the broker cancels the old ones when it finds this connection gone."""
        if self._streams:
            log.warning("the connection to the broker dropped: %d open request(s) move on", len(self._streams))
        self._fail_all(_ConnectionDropped("the connection to the broker dropped"))

    def _fail_all(self, error: MeshError) -> None:
        """Ends every open request with `error` and forgets them (their replies are ignored from now on)."""
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()

    # ------------------------------------------------------------------ incoming (called by the channels)

    def _on_reply(self, frames: list[bytes]) -> None:
        request_id = frames[0][2:]
        stream = self._streams.get(request_id)
        if stream is None:
            # A request this client gave up on. Tokens after the end mean it still runs (its CANCEL
            # lost with a dropped connection, say): stop it; the broker ignores a second CANCEL.
            if frames[0][:2] == _TOKENS_HEADER:
                self._front.send([pack_header(Kind.CANCEL, request_id)])
            return
        if stream.buffered_bytes >= self.max_buffered_bytes:
            stream.put(RequestError("the request was cancelled: its reader fell too far behind"))
            self._front.send([pack_header(Kind.CANCEL, request_id)])
            del self._streams[request_id]
            return
        stream.answered = True
        stream.put(frames)

    def _on_bus_message(self, frames: list[bytes]) -> None:
        try:
            self._on_bus(frames, time.monotonic())
        except ProtocolError as exc:
            log.warning("dropped a bus message: %s", exc)

    async def _watch_broker(self) -> None:
        """Fails every open request once the broker's beacon has been silent past the expiry."""
        while True:
            await asyncio.sleep(self._expiry / 3)
            silent = time.monotonic() - self._broker_seen_at > self._expiry
            if self._broker_info is not None and silent and self._streams:
                self._fail_all(BrokerUnavailableError("the broker stopped answering"))

    def _on_bus(self, frames: list[bytes], now: float) -> None:
        if len(frames) != 2:
            raise ProtocolError(f"{len(frames)} frames on the bus")
        kind, _ = parse_header(frames[0])
        if kind is Kind.ANNOUNCE:
            self.view.apply(decode(frames[1], Announcement), now)
        elif kind is Kind.WORKER_GONE:
            self.view.remove(decode(frames[1], WorkerGone).worker_id)
        elif kind is Kind.BEACON:
            info = decode(frames[1], BrokerInfo)
            previous = self._broker_info
            if previous is not None and previous.started_at != info.started_at:
                self._broker_restarted()
            self._broker_info, self._broker_seen_at = info, now
            self._broker_heard.set()
            if info.snapshot:
                self._snapshot_done.set()
        else:
            raise ProtocolError(f"{kind.name} on the bus")
