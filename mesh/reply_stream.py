"""One request's frames from its worker to the broker: numbered, and at most one per stream interval.

A step's tokens leave at once when the request's previous frame left at least
`interval` seconds ago. Otherwise they are held, joined with the next steps'
tokens, until it has (or until the last frame, DONE, which carries them). So no
token waits longer than `interval` while steps keep coming; when the engine
pauses, a timer sends what is held, as late as a millisecond past the interval
(uvloop's timers count whole milliseconds). The tokens of an engine whose steps
take longer (every real model: a decode step takes milliseconds) are seldom
held, only when a step's output reaches the worker late.

What it is for: an engine that outruns the mesh, such as the synthetic engine
with no delay, would send a frame per token. On a machine with few cores the
frames behind the first one compete with it for the CPU all the way to the
client (the worker, the broker, the gateway and their I/O threads each handle
every frame), and the first token arrives later than it would alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from mesh.engines import EngineError, EngineOutput
from mesh.protocol import MAX_MESSAGE_BYTES, Done, ErrorCode, Kind, TokenChunk, encode, pack_header

#: The coarsest an event loop's timers may be: uvloop's count whole milliseconds (a shorter delay
#: fires on the next iteration) and its clock ticks once a millisecond. Pacing therefore reads
#: time.monotonic(), and the timer for held tokens is never asked for less than this.
_TIMER_RESOLUTION = 0.001
#: Default for WorkerConfig.stream_interval: well under any real engine's step, and no shorter than
#: the timer that sends held tokens can keep.
DEFAULT_STREAM_INTERVAL = _TIMER_RESOLUTION


def _within_limit(body: bytes) -> bytes:
    """`body`, if the broker will take it: a larger frame would make it drop this worker's
    connection, and every other request's frames in flight on it."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise EngineError(
            ErrorCode.BAD_REQUEST,
            f"the reply is {len(body):,} bytes, more than the mesh's message limit of {MAX_MESSAGE_BYTES:,}: "
            "ask for fewer logprobs or a shorter echo",
        )
    return body


class ReplyStream:
    """Turns one request's engine outputs into TOKENS frames and a DONE frame, sent with `send`.

    `on_tokens` is told how many tokens each frame carries as it leaves (a frame, not a step: it is
    called far less often than `add` when steps are fast).

    Used from the request's task. The timer that sends held tokens runs outside it, so it does
    nothing once that task is cancelled (its frames would belong to a request already forgotten),
    and a failure there is raised in the task at its next output.
    """

    def __init__(
        self,
        send: Callable[[list[bytes]], None],
        request_id: bytes,
        interval: float,
        on_tokens: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._send = send
        self._request_id = request_id
        self._tokens_header = pack_header(Kind.TOKENS, request_id)
        self._interval = interval
        self._on_tokens = on_tokens
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._sent = 0  # frames sent: TokenChunk.seq of the last one
        self._last_sent_at = float("-inf")
        self._held: TokenChunk | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failure: EngineError | None = None

    def add(self, output: EngineOutput) -> None:
        """A step's output without a finish reason: sent now, or held for at most the interval."""
        self._raise_failure()
        token_ids = output.token_ids
        if not token_ids:
            if output.text:
                # The echo (the prompt's text): a frame of its own, never joined, never held. The client
                # tells it from the tokens' deltas by its having no token ids.
                self.flush()
                self._emit(TokenChunk(output.text, [], output.logprobs), paced=False)
            return
        held = self._held
        if held is None:
            self._held = TokenChunk(output.text, list(token_ids), output.logprobs)
        else:
            held.text += output.text
            held.token_ids += token_ids
            if output.logprobs:
                held.logprobs = (held.logprobs or []) + output.logprobs
        self._flush_or_wait()

    def finish(self, output: EngineOutput, worker_id: str) -> None:
        """The last frame: DONE, carrying what is held and the final output's own tokens."""
        self._raise_failure()
        self._cancel_timer()
        text, token_ids, logprobs = output.text, list(output.token_ids), output.logprobs
        if self._held is not None:
            held, self._held = self._held, None
            text, token_ids = held.text + text, held.token_ids + token_ids
            if held.logprobs or logprobs:
                logprobs = (held.logprobs or []) + (logprobs or [])
        assert output.finish_reason is not None
        done = Done(
            output.finish_reason,
            output.prompt_tokens,
            output.completion_tokens,
            worker_id,
            text,
            token_ids,
            logprobs,
            self._sent + 1,
        )
        body = _within_limit(encode(done))
        self._on_tokens(len(token_ids))
        self._send([pack_header(Kind.DONE, self._request_id), body])

    def fail(self, error_frames: list[bytes]) -> None:
        """Ends the reply with an error; the tokens held go first, as they would have without holding."""
        with contextlib.suppress(EngineError):  # held tokens too large to send: the error frame says what matters
            self.flush()
        self._send(error_frames)

    def flush(self) -> None:
        """Sends what is held, now."""
        self._cancel_timer()
        if self._held is not None:
            held, self._held = self._held, None
            self._emit(held)

    def discard(self) -> None:
        """Drops what is held (the request was cancelled)."""
        self._cancel_timer()
        self._held = None

    def _emit(self, chunk: TokenChunk, paced: bool = True) -> None:
        chunk.seq = self._sent + 1
        body = _within_limit(encode(chunk))
        self._sent += 1
        self._on_tokens(len(chunk.token_ids))
        self._send([self._tokens_header, body])
        if paced:  # the echo does not hold back the first token
            self._last_sent_at = time.monotonic()

    def _flush_or_wait(self) -> None:
        """Sends what is held if the interval since the last frame is up, or sees that a timer will."""
        wait = self._last_sent_at + self._interval - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(max(wait, _TIMER_RESOLUTION), self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        if self._task is not None and (self._task.done() or self._task.cancelling()):
            return  # cancelled or over: the task discards what is held
        try:
            self._flush_or_wait()  # a coarse timer may fire a little early
        except EngineError as exc:
            self._failure = exc

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
