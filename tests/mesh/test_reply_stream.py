"""The worker's reply stream (mesh.reply_stream): numbering, pacing, and what rides on DONE.

No sockets: the frames it would send are collected and decoded, as the broker and client would.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from mesh.engines import EngineError, EngineOutput
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    Done,
    ErrorCode,
    FinishReason,
    Kind,
    TokenChunk,
    TokenLogprob,
    decode,
    error_frames,
    parse_header,
)
from mesh.reply_stream import ReplyStream

REQUEST_ID = bytes(range(16))
#: Where a test needs tokens held and then sent by the timer: long enough that a stall of the test
#: process between two statements (on a busy CI machine) does not pass for the interval running out.
INTERVAL = 0.5


class Sent:
    """The frames a ReplyStream sent, decoded, and when each left."""

    def __init__(self) -> None:
        self.frames: list[list[bytes]] = []
        self.times: list[float] = []

    def __call__(self, frames: list[bytes]) -> None:
        self.frames.append(frames)
        self.times.append(time.monotonic())

    def decoded(self) -> list[TokenChunk | Done | Kind]:
        out: list[TokenChunk | Done | Kind] = []
        for frames in self.frames:
            kind, request_id = parse_header(frames[0])
            assert request_id == REQUEST_ID
            if kind is Kind.TOKENS:
                out.append(decode(frames[1], TokenChunk))
            elif kind is Kind.DONE:
                out.append(decode(frames[1], Done))
            else:
                out.append(kind)
        return out


def token(i: int, logprob: bool = False) -> EngineOutput:
    logprobs = [TokenLogprob(i, f" t{i}", -0.5)] if logprob else None
    return EngineOutput(text=f" t{i}", token_ids=[i], logprobs=logprobs)


def last(i: int) -> EngineOutput:
    output = token(i)
    output.finish_reason, output.prompt_tokens, output.completion_tokens = FinishReason.LENGTH, 3, i
    return output


async def test_with_no_interval_every_step_is_a_frame_numbered_from_one() -> None:
    sent = Sent()
    reply = ReplyStream(sent, REQUEST_ID, 0.0)
    for i in range(1, 4):
        reply.add(token(i))
    reply.finish(last(4), "w1")
    chunks = sent.decoded()
    assert [c.token_ids for c in chunks] == [[1], [2], [3], [4]]
    assert [c.seq for c in chunks] == [1, 2, 3, 4]  # type: ignore[union-attr]
    done = chunks[-1]
    assert isinstance(done, Done) and done.finish_reason is FinishReason.LENGTH and done.worker_id == "w1"


async def test_steps_faster_than_the_interval_travel_together_and_none_is_lost() -> None:
    sent = Sent()
    counted: list[int] = []
    reply = ReplyStream(sent, REQUEST_ID, 10.0, counted.append)  # longer than this test: only DONE sends the rest
    for i in range(1, 11):
        reply.add(token(i, logprob=True))
    assert len(sent.frames) == 1  # the first step left at once
    reply.finish(last(11), "w1")
    first, done = sent.decoded()
    assert isinstance(first, TokenChunk) and first.token_ids == [1] and first.seq == 1
    assert isinstance(done, Done) and done.seq == 2
    assert done.token_ids == list(range(2, 12))
    assert done.text == "".join(f" t{i}" for i in range(2, 12))
    assert [entry.token_id for entry in done.logprobs or []] == list(range(2, 11))  # the last output had none
    assert counted == [1, 10]  # told per frame as it leaves, not per step


async def test_held_tokens_leave_when_the_interval_is_up_without_waiting_for_more() -> None:
    sent = Sent()
    reply = ReplyStream(sent, REQUEST_ID, INTERVAL)
    reply.add(token(1))
    reply.add(token(2))
    reply.add(token(3))
    assert len(sent.frames) == 1
    # The engine is slow to make token 4: 2 and 3 must not wait for it, and by the time it comes, a
    # whole interval has passed since they left.
    await asyncio.sleep(2.5 * INTERVAL)
    chunks = sent.decoded()
    assert [c.token_ids for c in chunks] == [[1], [2, 3]]  # type: ignore[union-attr]
    reply.add(token(4))  # the last frame left long enough ago: at once
    assert [c.token_ids for c in sent.decoded()] == [[1], [2, 3], [4]]  # type: ignore[union-attr]
    assert [c.seq for c in sent.decoded()] == [1, 2, 3]  # type: ignore[union-attr]


async def test_the_echo_is_a_frame_of_its_own_and_does_not_hold_the_first_token() -> None:
    sent = Sent()
    reply = ReplyStream(sent, REQUEST_ID, 10.0)
    reply.add(EngineOutput(text="the prompt"))
    reply.add(token(1))
    chunks = sent.decoded()
    assert [(c.text, c.token_ids) for c in chunks] == [("the prompt", []), (" t1", [1])]  # type: ignore[union-attr]


async def test_an_error_sends_the_held_tokens_first() -> None:
    sent = Sent()
    reply = ReplyStream(sent, REQUEST_ID, 10.0)
    reply.add(token(1))
    reply.add(token(2))
    reply.fail(error_frames(REQUEST_ID, ErrorCode.INTERNAL, "engine failure"))
    assert sent.decoded()[:2] == [TokenChunk(" t1", [1], seq=1), TokenChunk(" t2", [2], seq=2)]
    assert parse_header(sent.frames[2][0])[0] is Kind.ERROR


async def test_a_cancelled_request_sends_nothing_more() -> None:
    sent = Sent()

    async def serve() -> None:
        reply = ReplyStream(sent, REQUEST_ID, INTERVAL)
        reply.add(token(1))
        reply.add(token(2))
        await asyncio.sleep(10)  # cancelled here, as the worker cancels a request the broker took back

    task = asyncio.create_task(serve())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(1.5 * INTERVAL)  # past the interval: the held token's timer has fired
    assert [c.token_ids for c in sent.decoded()] == [[1]]  # type: ignore[union-attr]
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_held_tokens_too_large_for_a_frame_fail_the_request_at_its_next_step() -> None:
    sent = Sent()
    too_large = EngineOutput(text="x" * (MAX_MESSAGE_BYTES + 1), token_ids=[2])  # built first: it takes a while
    reply = ReplyStream(sent, REQUEST_ID, INTERVAL)
    reply.add(token(1))
    reply.add(too_large)  # held: the first frame left just now
    assert len(sent.frames) == 1
    await asyncio.sleep(1.5 * INTERVAL)  # the timer found it too large to send
    with pytest.raises(EngineError, match="message limit"):
        reply.add(token(3))
    assert [c.token_ids for c in sent.decoded()] == [[1]]  # type: ignore[union-attr]


@pytest.mark.parametrize("interval", [0.0005, 0.0015])
def test_on_uvloop_no_frame_leaves_before_the_interval_is_up(interval: float) -> None:
    """The worker runs on uvloop, whose clock and timers count whole milliseconds: a 0.5 ms timer
    fires on the next iteration. Pacing by them sent a frame per step."""
    sent = Sent()

    async def serve() -> None:
        reply = ReplyStream(sent, REQUEST_ID, interval)
        produced = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.03:  # an engine with no delay: a step per loop iteration
            produced += 1
            reply.add(token(produced))
            await asyncio.sleep(0)
        reply.add(token(produced + 1))  # then a stall: what is held must leave on the timer alone
        await asyncio.sleep(0.05)
        assert sum(len(c.token_ids) for c in sent.decoded()) == produced + 1  # type: ignore[union-attr]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())
    gaps = [later - earlier for earlier, later in zip(sent.times, sent.times[1:], strict=False)]
    assert gaps and min(gaps) >= interval
