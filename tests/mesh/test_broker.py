"""The broker, worker runtime and client, end to end: real processes on loopback.

Workers here run the synthetic engine (fake tokens, no model): these tests are
about routing, queueing, cancellation and failure, where a model's speed
would only add time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections import Counter

import pytest
import zmq
import zmq.asyncio

from mesh.broker import warm_up_seconds
from mesh.client import Completion, MeshClient
from mesh.discovery import HEARTBEAT_INTERVAL
from mesh.endpoints import Endpoints
from mesh.errors import (
    BadRequestError,
    BrokerUnavailableError,
    ContextLengthError,
    EngineFailureError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
    WorkerLostError,
)
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    Announcement,
    BrokerInfo,
    FinishReason,
    GenerateRequest,
    Kind,
    decode,
    encode,
    new_request_id,
    pack_header,
    parse_header,
)
from tests.support import ProcessGroup, hand_made_worker, recv, wait_for_workers


async def counted_by_broker(client: MeshClient, reason: str, timeout: float = 5.0) -> None:
    """Waits until the broker reports a message dropped for `reason` (its beacon, every heartbeat, carries
    the counts)."""
    deadline = time.monotonic() + timeout
    while client.broker_info is None or not client.broker_info.dropped.get(reason, 0):
        assert time.monotonic() < deadline, client.broker_info
        await asyncio.sleep(0.05)


def request(
    model: str = "synthetic", max_tokens: int = 4, prompt: str = "hello mesh", **fields: object
) -> GenerateRequest:
    return GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens, **fields)  # type: ignore[arg-type]


async def test_generate_with_one_worker(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        chunks = [chunk async for chunk in client.generate(request(max_tokens=5, seed=3))]
        assert sum(len(c.token_ids) for c in chunks) == 5
        last = chunks[-1]
        assert last.finish_reason is FinishReason.LENGTH
        assert last.usage is not None and last.usage.completion_tokens == 5 and last.usage.prompt_tokens == 2
        assert last.worker_id == "w1"
        again = await client.complete(request(max_tokens=5, seed=3))
        assert again.text == "".join(c.text for c in chunks)  # same seed, same text


async def test_a_slow_reader_takes_the_waiting_tokens_as_one_delta(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    # 40 tokens 10 ms apart: the first delta is taken long before the last token
    # exists, even on a busy machine (with no delay, a reader that wakes late got
    # all 40 in its first delta).
    processes.synthetic_worker(broker_url, "w1", "--itl-ms", "10")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        whole = await client.complete(request(max_tokens=40, seed=5))
        async with contextlib.aclosing(client.generate(request(max_tokens=40, seed=5))) as stream:
            first = await anext(stream)
            assert first.finish_reason is None
            await asyncio.sleep(1.0)  # the other tokens and DONE arrive meanwhile
            rest = await anext(stream)
        assert len(first.token_ids) + len(rest.token_ids) == 40
        assert rest.finish_reason is FinishReason.LENGTH and rest.usage is not None
        assert first.text + rest.text == whole.text
        assert first.token_ids + rest.token_ids == whole.token_ids


async def test_a_reader_too_far_behind_is_cancelled_and_frees_its_worker(
    processes: ProcessGroup, broker_url: str
) -> None:
    processes.broker(broker_url)
    # One slot, and a stream that would hold it for 10 s: the next request gets through only if
    # the slow one is cancelled on the worker, not just abandoned by its reader.
    processes.synthetic_worker(broker_url, "w1", "--capacity", "1", "--itl-ms", "5")
    async with MeshClient(broker_url, max_buffered_bytes=4096) as client:
        await wait_for_workers(client, 1)
        received = 0
        async with contextlib.aclosing(client.generate(request(max_tokens=2000, logprobs=5))) as stream:
            received += len((await anext(stream)).token_ids)
            await asyncio.sleep(1.0)  # about 200 frames of some 200 bytes each arrive meanwhile
            with pytest.raises(RequestError, match="fell too far behind"):
                async with asyncio.timeout(5):
                    async for chunk in stream:
                        received += len(chunk.token_ids)
        assert received < 2000
        started = time.monotonic()
        after = await asyncio.wait_for(client.complete(request(max_tokens=10)), 5)
        assert after.finish_reason is FinishReason.LENGTH
        assert time.monotonic() - started < 3


async def test_requests_dropped_for_a_client_that_stopped_reading_end_with_an_error(
    processes: ProcessGroup, broker_url: str
) -> None:
    """The broker drops the requests of a client whose connection stays full; once the client reads
    again, each of them ends with DONE or with the broker's error, none in silence."""
    processes.broker(broker_url)
    # Unpaced, so 16 fast streams send one frame per token: tens of thousands of frames, enough to
    # fill the broker's high-water mark (counted in frames) towards the client. Paced, the same
    # tokens travel in so few frames that they all fit, and nothing is ever dropped.
    processes.synthetic_worker(broker_url, "w1", "--capacity", "16", "--stream-interval-ms", "0")
    ctx = zmq.Context()
    try:
        stalled = ctx.socket(zmq.DEALER)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.RCVHWM, 100)
        stalled.connect(Endpoints.from_url(broker_url).front)
        async with MeshClient(broker_url) as watcher:
            await wait_for_workers(watcher, 1)
            for seed in range(16):
                body = encode(request(max_tokens=4000, logprobs=20, seed=seed))
                stalled.send_multipart([pack_header(Kind.SUBMIT, new_request_id()), b"synthetic", body])
            deadline = time.monotonic() + 30
            while watcher.broker_info is None or not watcher.broker_info.dropped.get("client_gone"):
                assert time.monotonic() < deadline, "the broker never gave up on the stalled client"
                await asyncio.sleep(0.1)
        endings: dict[bytes, bytes] = {}
        while len(endings) < 16:
            assert stalled.poll(10_000), f"only {len(endings)} of 16 requests ended"
            frames = stalled.recv_multipart()
            kind, request_id = parse_header(frames[0])
            if kind in (Kind.DONE, Kind.ERROR):
                endings[request_id] = frames[1] if kind is Kind.ERROR else b"done"
        assert any(b"stopped reading" in ending for ending in endings.values())
    finally:
        ctx.destroy(linger=0)


async def test_a_workers_default_seed_differs_per_choice_and_repeats(processes: ProcessGroup, broker_url: str) -> None:
    """A worker's --seed serves requests that bring none: the n choices of one request differ, and
    the same request gives the same choices again."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--seed", "5")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)

        async def choices() -> list[str]:
            requests = [request(max_tokens=8, choice_index=i) for i in range(3)]
            return [c.text for c in await asyncio.gather(*(client.complete(r) for r in requests))]

        first = await choices()
        assert len(set(first)) == 3
        assert await choices() == first


async def test_two_workers_with_one_id_do_not_take_turns(processes: ProcessGroup, broker_url: str) -> None:
    """A --worker-id given twice: the newer process serves, the older one is ignored (and reported),
    instead of each burying the other at every heartbeat with the requests in flight."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "twin", "--itl-ms", "20")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        second = processes.synthetic_worker(broker_url, "twin", "--itl-ms", "20")
        deadline = time.monotonic() + 30
        while "serving" not in second.output():
            assert time.monotonic() < deadline and second.alive(), second.output()
            await asyncio.sleep(0.1)
        streams = (client.complete(request(max_tokens=50)) for _ in range(10))
        results = await asyncio.wait_for(asyncio.gather(*streams), 30)
        assert all(r.finish_reason is FinishReason.LENGTH for r in results)
        await counted_by_broker(client, "older_incarnation")


async def test_closing_the_client_ends_its_open_streams(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--itl-ms", "50")
    client = MeshClient(broker_url)
    await client.start()
    try:
        await wait_for_workers(client, 1)
        first = asyncio.Event()

        async def read_all() -> None:
            async for _ in client.generate(request(max_tokens=1000)):
                first.set()

        reader = asyncio.create_task(read_all())
        await asyncio.wait_for(first.wait(), 10)
        await client.close()
        with pytest.raises(BrokerUnavailableError, match="closed"):
            await asyncio.wait_for(reader, 5)
    finally:
        await client.close()  # a second close does nothing


async def test_messages_over_the_size_limit_fail_their_own_request_only(
    processes: ProcessGroup, broker_url: str
) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--itl-ms", "20")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        bystander = asyncio.create_task(client.complete(request(max_tokens=50, seed=9)))
        # A request the broker could not take: refused here, before it costs the connection.
        with pytest.raises(BadRequestError, match="message limit"):
            await client.complete(request(prompt="x" * (MAX_MESSAGE_BYTES + 1)))
        # A reply the broker could not take: 1,100 words of 8,000 characters fit in a request, but
        # their echo with logprobs (the text, then every word again) does not fit in one reply.
        words = " ".join(f"{n:04d}" + "y" * 7996 for n in range(1100))
        with pytest.raises(BadRequestError, match="message limit"):
            await client.complete(request(prompt=words, echo=True, prompt_logprobs=0, max_tokens=1))
        done = await asyncio.wait_for(bystander, 10)
        assert len(done.token_ids) == done.usage.completion_tokens == 50 and done.worker_id == "w1"
        after = await client.complete(request(echo=True, prompt_logprobs=1))
        assert after.text.startswith("hello mesh") and after.worker_id == "w1"


async def test_generate_with_three_workers_and_aliases(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    for worker_id in ("w1", "w2", "w3"):
        processes.synthetic_worker(broker_url, worker_id, models="main,alias-a")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 3)
        assert {"main", "alias-a"} <= set(client.models())
        results = await asyncio.gather(*(client.complete(request("alias-a", seed=i)) for i in range(12)))
        assert {r.worker_id for r in results} == {"w1", "w2", "w3"}
        assert all(r.finish_reason is FinishReason.LENGTH for r in results)
        by_name = await client.complete(request("main", seed=1))
        by_alias = await client.complete(request("alias-a", seed=1))
        assert by_name.text == by_alias.text


async def test_shortest_queue_spreads_in_proportion_to_capacity(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    for worker_id, capacity in (("c1", 1), ("c2", 2), ("c3", 3)):
        # 50 ms a token: a request holds its slot 0.4 s, so a stall of the machine's making moves few.
        processes.synthetic_worker(broker_url, worker_id, "--capacity", str(capacity), "--itl-ms", "50")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 3)
        results = await asyncio.gather(*(client.complete(request(max_tokens=8)) for _ in range(30)))
    served = Counter(r.worker_id for r in results)
    # 30 requests over capacities 1:2:3 -> about 5, 10, 15.
    assert abs(served["c1"] - 5) <= 2 and abs(served["c2"] - 10) <= 3 and abs(served["c3"] - 15) <= 3, served


async def test_a_worker_announces_its_throughput_and_the_speed_one_request_gets(
    processes: ProcessGroup, broker_url: str
) -> None:
    """Four requests at once, each at most 100 tokens/s (10 ms apart): the worker's speed, which
    dispatch compares, is what one request gets, not what all four make together."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--itl-ms", "10")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        await asyncio.gather(*(client.complete(request(max_tokens=100)) for _ in range(4)))
        await asyncio.sleep(HEARTBEAT_INTERVAL * 2)
        (worker,) = client.workers()
    assert 40 < worker.request_tokens_per_s <= 105 and worker.tokens_per_s > 0, worker  # not 4 x 100


async def test_subscribers_joining_together_share_snapshots(processes: ProcessGroup, broker_url: str) -> None:
    """XPUB cannot answer one subscriber alone: each snapshot of the mesh goes to every subscriber. Sixty
    joining at once (as all do after a key is revoked) must not cost sixty snapshots to each of them."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
    ctx = zmq.asyncio.Context()
    try:
        subscribers = []
        for _ in range(60):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.subscribe(b"")
            sub.connect(Endpoints.from_url(broker_url).bus_out)
            subscribers.append(sub)

        async def snapshots_heard(sub: zmq.asyncio.Socket) -> int:
            count, deadline = 0, time.monotonic() + 2.0
            while (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    header, body = await asyncio.wait_for(sub.recv_multipart(), left)
                    if parse_header(header)[0] is Kind.BEACON and decode(body, BrokerInfo).snapshot:
                        count += 1
            return count

        heard = await asyncio.gather(*(snapshots_heard(sub) for sub in subscribers))
    finally:
        ctx.destroy(linger=0)
    assert min(heard) >= 1, heard  # every one got the mesh's state
    assert max(heard) < 30, heard  # not one snapshot per subscriber


async def test_a_request_too_long_for_one_workers_context_goes_to_a_longer_one(
    processes: ProcessGroup, broker_url: str
) -> None:
    """Workers of one model may serve different contexts (--max-model-len): a request that fits only the
    longer one is moved there, not refused, whichever the policy picked first."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "short", "--max-model-len", "1000")
    processes.synthetic_worker(broker_url, "long", "--max-model-len", "4096")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 2)
        assert sorted(w.context_length for w in client.workers()) == [1000, 4096]
        done = await asyncio.wait_for(
            asyncio.gather(*(client.complete(request(max_tokens=2000)) for _ in range(6))), 20
        )
        assert {d.worker_id for d in done} == {"long"}
        assert all(d.usage.completion_tokens == 2000 for d in done)
        with pytest.raises(ContextLengthError, match="4096"):  # too long for every worker: the longest says so
            await client.complete(request(max_tokens=5000))
        short = await asyncio.gather(*(client.complete(request(max_tokens=10)) for _ in range(8)))
        assert {d.worker_id for d in short} == {"short", "long"}  # both still serve what fits both


async def test_a_request_too_long_for_the_free_workers_waits_for_a_busy_longer_one(
    processes: ProcessGroup, broker_url: str
) -> None:
    """When the only worker with context enough is busy, a request that fits only it waits for its slot
    instead of being refused, and requests that fit the free worker go first meanwhile. When no worker
    with context enough is left to wait for, the waiting request gets the refusal."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "short", "--max-model-len", "1000")
    long_worker = processes.synthetic_worker(
        broker_url, "long", "--max-model-len", "4096", "--capacity", "1", "--itl-ms", "20"
    )
    # 995 prompt tokens (one per word, for the synthetic engine) and more: too long for "short" only.
    long_prompt = " ".join(["word"] * 995)
    too_long_for_short = request(prompt=long_prompt, max_tokens=10)
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 2)

        async def take_long_workers_slot() -> asyncio.Task[Completion]:
            """A request in "long"'s one slot for 3 s (its prompt fits no other worker)."""
            blocker = asyncio.create_task(client.complete(request(prompt=long_prompt, max_tokens=150)))
            deadline = time.monotonic() + 10
            while not any(w.worker_id == "long" and w.inflight for w in client.workers()):
                assert time.monotonic() < deadline and not blocker.done(), blocker
                await asyncio.sleep(0.02)
            return blocker

        blocker = await take_long_workers_slot()
        waiting = asyncio.create_task(client.complete(too_long_for_short))
        fitting = await asyncio.wait_for(asyncio.gather(*(client.complete(request(max_tokens=3)) for _ in range(4))), 5)
        assert {d.worker_id for d in fitting} == {"short"}
        assert not blocker.done() and not waiting.done()  # it waits: it was neither refused nor served
        assert (await asyncio.wait_for(blocker, 15)).worker_id == "long"
        served = await asyncio.wait_for(waiting, 10)
        assert (served.worker_id, served.usage.prompt_tokens, served.usage.completion_tokens) == ("long", 995, 10)

        # Again, but the longer worker leaves (it drains) while the request waits for it.
        blocker = await take_long_workers_slot()
        waiting = asyncio.create_task(client.complete(too_long_for_short))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        long_worker.signal(signal.SIGTERM)
        with pytest.raises(ContextLengthError, match="1000"):  # the refusal it had from "short"
            await asyncio.wait_for(waiting, 5)
        assert (await asyncio.wait_for(blocker, 15)).worker_id == "long"  # the drain finishes what it has


async def test_unknown_model_is_refused_at_once(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        # Past the new broker's warm-up, when unseen models may still appear.
        await asyncio.sleep(warm_up_seconds(HEARTBEAT_INTERVAL))
        start = time.monotonic()
        with pytest.raises(ModelNotFoundError, match="not served"):
            await client.complete(request("no-such-model"))
        assert time.monotonic() - start < 1.0


async def test_overload_beyond_the_queue_is_refused_at_once(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url, "--max-queue", "2")
    processes.synthetic_worker(broker_url, "w1", "--capacity", "1", "--itl-ms", "100")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        running = asyncio.create_task(client.complete(request(max_tokens=20)))
        await asyncio.sleep(0.2)
        queued = [asyncio.create_task(client.complete(request(max_tokens=1))) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(OverloadedError):
            await client.complete(request(max_tokens=1))
        for finished in await asyncio.gather(running, *queued):
            assert finished.finish_reason is FinishReason.LENGTH  # nobody else was disturbed


async def test_cancel_reaches_the_worker_and_frees_the_slot(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--capacity", "1", "--itl-ms", "50")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)

        async def consume() -> None:
            async for _ in client.generate(request(max_tokens=4000)):
                pass

        task = asyncio.create_task(consume())
        deadline = time.monotonic() + 5
        while client.workers()[0].inflight != 1:
            assert time.monotonic() < deadline, "the worker never reported the request"
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        while client.workers()[0].inflight != 0:
            assert time.monotonic() < deadline, "the worker still runs the cancelled request"
            await asyncio.sleep(0.02)
        # The only slot is free again: a new request runs at once.
        done = await asyncio.wait_for(client.complete(request(max_tokens=2)), 2)
        assert done.finish_reason is FinishReason.LENGTH


async def test_queued_request_of_a_departed_client_is_dropped(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--capacity", "1", "--itl-ms", "20")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        running = asyncio.create_task(client.complete(request(max_tokens=50)))  # the only slot, for 1 s
        await asyncio.sleep(0.1)
        # A client that leaves without a word (no CANCEL): its request waits for the slot, its socket is gone.
        ctx = zmq.Context()
        leaver = ctx.socket(zmq.DEALER)
        leaver.connect(Endpoints.from_url(broker_url).front)
        submit = [pack_header(Kind.SUBMIT, new_request_id()), b"synthetic", encode(request(max_tokens=4000))]
        leaver.send_multipart(submit)
        ctx.destroy(linger=1000)  # once the SUBMIT is out
        assert not running.done()
        await running
        # Had the departed client's request run, it would hold the only slot for 80 s.
        done = await asyncio.wait_for(client.complete(request(max_tokens=2)), 3)
        assert done.worker_id == "w1"
        await counted_by_broker(client, "client_gone")


async def test_kill_9_of_a_worker(processes: ProcessGroup, broker_url: str) -> None:
    """Detected within 2 s; unstarted requests finish elsewhere; started ones end with worker_lost."""
    processes.broker(broker_url, "--dispatch-method", "round_robin")
    slow_starter = processes.synthetic_worker(broker_url, "slow", "--ttft-ms", "60000", "--capacity", "8")
    processes.synthetic_worker(broker_url, "steady", "--capacity", "8")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 2)
        unstarted = [asyncio.create_task(client.complete(request(max_tokens=3))) for _ in range(8)]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        slow_starter.signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*unstarted), 5)
        assert {r.worker_id for r in results} == {"steady"}
        while any(w.worker_id == "slow" for w in client.workers()):
            assert time.monotonic() - killed_at < 2.0, "the dead worker is still listed"
            await asyncio.sleep(0.02)

    streamer = processes.synthetic_worker(broker_url, "streamer", "--itl-ms", "100", models="streamed")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1, model="streamed")
        stream = client.generate(request("streamed", max_tokens=1000))
        first = await anext(stream)
        assert first.token_ids
        streamer.signal(signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass


async def test_broker_restart(processes: ProcessGroup, broker_url: str) -> None:
    broker = processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    processes.synthetic_worker(broker_url, "w2")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 2)
        assert (await client.complete(request())).finish_reason is FinishReason.LENGTH
        old_start = client.broker_info.started_at
        broker.signal(signal.SIGKILL)
        broker.popen.wait()
        processes.broker(broker_url)
        restarted = time.monotonic()
        # A request sent while the new broker is still learning its workers waits for them.
        early = asyncio.create_task(client.complete(request()))
        while not (client.broker_info.started_at != old_start and client.broker_info.workers == 2):
            assert time.monotonic() - restarted < 10, "workers did not come back"  # from Popen: start-up too
            await asyncio.sleep(0.05)
        # The same client keeps working through the new broker.
        assert (await asyncio.wait_for(client.complete(request()), 5)).finish_reason is FinishReason.LENGTH
        assert (await asyncio.wait_for(early, 5)).finish_reason is FinishReason.LENGTH
    assert all(p.alive() for p in processes.processes[1:3]), "a worker exited"


async def test_malformed_frames_on_every_port_crash_nothing(processes: ProcessGroup, broker_url: str) -> None:
    broker = processes.broker(broker_url)
    worker = processes.synthetic_worker(broker_url, "w1")
    endpoints = Endpoints.from_url(broker_url)
    garbage = [
        [b""],
        [b"\xff" * 3],
        [pack_header(Kind.SUBMIT, new_request_id())],  # too few frames
        [pack_header(Kind.SUBMIT, new_request_id()), b"synthetic", b"\xc1not msgpack"],
        [pack_header(Kind.SUBMIT, new_request_id()), b"\xff\xfe", b"x"],  # model name not UTF-8
        [pack_header(Kind.TOKENS, new_request_id()), b"x"],  # a client cannot send tokens
        [bytes((99, 1)) + new_request_id(), b"m", b"x"],  # unknown version
        [pack_header(Kind.ANNOUNCE), b"\x93garbage"],
        [pack_header(Kind.DONE, new_request_id()), b"\x00"],
        [b"x" * 100_000, b"y"],
    ]
    ctx = zmq.Context()
    try:
        front = ctx.socket(zmq.DEALER)
        back = ctx.socket(zmq.DEALER)
        # Not the real worker's identity: whichever of two equal identities connects first
        # owns it, which would make this test a race rather than a check.
        back.setsockopt(zmq.IDENTITY, b"intruder")
        bus_in = ctx.socket(zmq.PUB)
        bus_out = ctx.socket(zmq.XSUB)
        for sock, endpoint in (
            (front, endpoints.front),
            (back, endpoints.back),
            (bus_in, endpoints.bus_in),
            (bus_out, endpoints.bus_out),
        ):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        await asyncio.sleep(0.3)
        for _ in range(20):
            for frames in garbage:
                for sock in (front, back, bus_in, bus_out):
                    sock.send_multipart(frames)
        await asyncio.sleep(0.5)
        assert broker.alive() and worker.alive()
        async with MeshClient(broker_url) as client:
            await wait_for_workers(client, 1)
            assert (await asyncio.wait_for(client.complete(request()), 5)).finish_reason is FinishReason.LENGTH
            info = await client.wait_for_broker()
            await asyncio.sleep(0.6)  # the next beacon carries the counters
            assert sum(client.broker_info.dropped.values()) > 0, info
    finally:
        ctx.destroy(linger=0)


async def test_an_announcement_with_an_impossible_speed_is_dropped(processes: ProcessGroup, broker_url: str) -> None:
    """A lottery broker weighs workers by their announced speed: an infinite one must not reach it."""
    broker = processes.broker(broker_url, "--dispatch-method", "lottery")
    processes.synthetic_worker(broker_url, "w1")
    ctx = zmq.Context()
    try:
        bus_in = ctx.socket(zmq.PUB)
        bus_in.setsockopt(zmq.LINGER, 0)
        bus_in.connect(Endpoints.from_url(broker_url).bus_in)
        liar = Announcement(
            worker_id="liar", models=["synthetic"], backend="x", capacity=4, request_tokens_per_s=math.inf
        )
        async with MeshClient(broker_url) as client:
            await wait_for_workers(client, 1)
            for _ in range(10):
                bus_in.send_multipart([pack_header(Kind.ANNOUNCE), encode(liar)])
                await asyncio.sleep(0.05)
            results = await asyncio.wait_for(asyncio.gather(*(client.complete(request()) for _ in range(8))), 10)
            assert {r.worker_id for r in results} == {"w1"} and broker.alive()
            await asyncio.sleep(0.6)  # the next beacon carries the counters
            assert client.broker_info is not None and client.broker_info.dropped.get("malformed", 0) > 0
    finally:
        ctx.destroy(linger=0)


async def test_slots_of_cancelled_requests_are_reusable_at_once(processes: ProcessGroup, broker_url: str) -> None:
    """Fill a worker, cancel everything, refill at once: no request is refused or lost."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--capacity", "4", "--itl-ms", "20")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)

        async def consume(req: GenerateRequest) -> None:
            async for _ in client.generate(req):
                pass

        for _ in range(5):
            running = [asyncio.create_task(consume(request(max_tokens=4000))) for _ in range(4)]
            await asyncio.sleep(0.1)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            refill = await asyncio.wait_for(asyncio.gather(*(client.complete(request()) for _ in range(4))), 10)
            assert all(r.finish_reason is FinishReason.LENGTH for r in refill)


async def test_a_reply_no_one_can_read_ends_its_request_with_an_error(processes: ProcessGroup, broker_url: str) -> None:
    """A worker from another release, or a corrupt frame: the request ends with a MeshError and frees
    the worker's slot, instead of waiting forever."""
    processes.broker(broker_url)

    async def next_request(back: zmq.Socket) -> bytes:
        while True:
            kind, request_id = parse_header((await recv(back))[0])
            if kind is Kind.SUBMIT:
                return request_id

    async with hand_made_worker(broker_url, "raw", "raw") as back, MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        # An ERROR frame the broker cannot decode: the request ends, and the one slot is free again.
        first = asyncio.create_task(client.complete(request("raw")))
        back.send_multipart([pack_header(Kind.ERROR, await next_request(back)), b"\xc1"])
        with pytest.raises(EngineFailureError, match="could not be read"):
            await asyncio.wait_for(first, 5)
        # A TOKENS frame the broker forwards unread and the client cannot decode: a MeshError, and the
        # request is cancelled on its worker.
        second = asyncio.create_task(client.complete(request("raw")))
        request_id = await next_request(back)
        back.send_multipart([pack_header(Kind.TOKENS, request_id), b"\xc1"])
        with pytest.raises(EngineFailureError, match="could not be read"):
            await asyncio.wait_for(second, 5)
        assert parse_header((await recv(back))[0]) == (Kind.CANCEL, request_id)
