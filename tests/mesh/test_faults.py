"""Fault injection on real processes: kill -9 under load, SIGSTOP, broker restart, a stalled client, gateway 503.

Every worker here runs the SYNTHETIC engine (fake, deterministic tokens, no model): these tests
are about what the mesh does when its processes fail, and a model would only add time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import pytest
import zmq

from mesh.client import MeshClient
from mesh.discovery import HEARTBEAT_INTERVAL
from mesh.endpoints import Endpoints
from mesh.engines.base import EngineConfig
from mesh.engines.synthetic import SyntheticEngine
from mesh.errors import BrokerUnavailableError, WorkerLostError
from mesh.protocol import (
    FinishReason,
    GenerateRequest,
    Kind,
    TokenChunk,
    encode,
    new_request_id,
    pack_header,
    parse_header,
)
from mesh.transport import RECONNECT_INTERVAL_MAX_S
from tests.support import (
    REPO_ROOT,
    ProcessGroup,
    TcpRelay,
    free_broker_url,
    free_port,
    hand_made_worker,
    recv,
    wait_for_workers,
)

pytestmark = pytest.mark.timeout(120)


def _request(i: int, max_tokens: int, model: str = "synthetic", **fields: object) -> GenerateRequest:
    return GenerateRequest(model=model, prompt=f"fault test {i}", max_tokens=max_tokens, seed=i, **fields)  # type: ignore[arg-type]


async def _expected_text(request: GenerateRequest) -> str:
    """What an uninterrupted synthetic worker produces for `request` (it is a pure function of seed and prompt)."""
    engine = SyntheticEngine(EngineConfig(backend="synthetic"))
    return "".join([out.text async for out in engine.generate(request, "reference")])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _until(predicate, timeout: float, message: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{message} (waited {timeout} s)")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_kill_9_under_64_streams_migrates_started_requests(
    processes: ProcessGroup, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Started requests continue elsewhere from the tokens already streamed; the rest finish elsewhere."""
    caplog.set_level(logging.INFO, logger="mesh.client")
    processes.broker(broker_url)
    workers = {
        name: processes.synthetic_worker(broker_url, name, "--itl-ms", "20", "--capacity", "16")
        for name in ("victim", "a", "b")
    }
    requests = [_request(i, max_tokens=60) for i in range(64)]
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 3)

        async def stream(request: GenerateRequest) -> tuple[str, int, str]:
            text, tokens, worker = [], 0, ""
            async for chunk in client.generate(request):
                text.append(chunk.text)
                tokens += len(chunk.token_ids)
                worker = chunk.worker_id or worker
            return "".join(text), tokens, worker

        tasks = [asyncio.create_task(stream(r)) for r in requests]
        await _until(
            lambda: any(w.inflight >= 8 for w in client.workers() if w.worker_id == "victim"),
            10,
            "the victim never got busy",
        )
        await asyncio.sleep(0.3)  # its requests are mid-stream
        workers["victim"].signal(signal.SIGKILL)
        _, pending = await asyncio.wait(tasks, timeout=60)  # none hangs
        assert not pending, f"{len(pending)} hung; broker: {client.broker_info}; workers: {client.workers()}"
        results = [t.result() for t in tasks]  # none fails
    for request, (text, tokens, worker) in zip(requests, results, strict=True):
        assert tokens == request.max_tokens
        assert worker in ("a", "b")
        assert text == await _expected_text(request), "a migrated stream must continue, not restart"
    assert any("request migrates" in r.getMessage() for r in caplog.records), "no request was mid-stream"
    assert workers["a"].alive() and workers["b"].alive()


async def test_worker_lost_without_migration(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    victim = processes.synthetic_worker(broker_url, "victim", "--itl-ms", "50")
    processes.synthetic_worker(broker_url, "other", "--itl-ms", "50")
    async with MeshClient(broker_url, migrate=False) as client:
        await wait_for_workers(client, 2)
        streams = [client.generate(_request(i, 60)) for i in range(8)]
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        assert all(f.token_ids for f in firsts)
        victim.signal(signal.SIGKILL)

        async def drain(stream) -> str:  # type: ignore[no-untyped-def]
            try:
                async for _ in stream:
                    pass
            except WorkerLostError:
                return "lost"
            return "done"

        outcomes = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 30)
        assert "lost" in outcomes and "done" in outcomes


async def test_requests_a_draining_worker_never_started_finish_elsewhere(
    processes: ProcessGroup, broker_url: str
) -> None:
    """A drain that runs out of time gives up requests that had no token yet: they are retried, not lost."""
    processes.broker(broker_url)
    slow = processes.synthetic_worker(
        broker_url, "slow", "--ttft-ms", "60000", "--drain-timeout", "0.5", "--capacity", "4"
    )
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 1)
        pending = [asyncio.create_task(client.complete(_request(i, 5))) for i in range(4)]
        await _until(lambda: any(w.inflight >= 4 for w in client.workers()), 10, "the slow worker never got busy")
        processes.synthetic_worker(broker_url, "fresh")
        await wait_for_workers(client, 2)
        slow.signal(signal.SIGTERM)
        done = await asyncio.wait_for(asyncio.gather(*pending), 20)
        assert {d.worker_id for d in done} == {"fresh"}
        for i, d in enumerate(done):
            assert d.text == await _expected_text(_request(i, 5))


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_blip_on_the_clients_connection_loses_no_token(processes: ProcessGroup, broker_url: str) -> None:
    """The client's connection to the broker drops while its requests stream, and one waits in the
    broker's queue: each still ends with exactly the tokens of an uninterrupted run (no gap, no hang)."""
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1", "--itl-ms", "20", "--capacity", "4")
    relayed = free_broker_url()
    # The client uses the front (port) and the bus it listens to (port + 3): both through relays.
    front = TcpRelay(_port(relayed), _port(broker_url))
    bus_out = TcpRelay(_port(relayed) + 3, _port(broker_url) + 3)
    async with front, bus_out, MeshClient(relayed) as client:
        await wait_for_workers(client, 1)
        requests = [_request(i, 60) for i in range(5)]
        pending = [asyncio.create_task(client.complete(r)) for r in requests]
        await asyncio.sleep(0.5)
        assert front.cut() == 1
        done = await asyncio.wait_for(asyncio.gather(*pending), 30)
        for request, result in zip(requests, done, strict=True):
            assert result.text == await _expected_text(request)
            assert result.usage.completion_tokens == 60


async def test_a_blip_on_a_workers_connection_loses_no_token(processes: ProcessGroup, broker_url: str) -> None:
    """The worker's connection to the broker drops mid-stream, again and again: every request still
    ends with exactly the tokens of an uninterrupted run, and no slot leaks on the broker."""
    processes.broker(broker_url)
    relayed = free_broker_url()
    # The worker uses the back (port + 1) and the bus it publishes on (port + 2): both through relays.
    back = TcpRelay(_port(relayed) + 1, _port(broker_url) + 1)
    bus_in = TcpRelay(_port(relayed) + 2, _port(broker_url) + 2)
    async with back, bus_in:
        # Tokens with no delay, a frame each (unpaced): at any moment many are on the wire, and a cut
        # loses them.
        processes.synthetic_worker(relayed, "w1", "--capacity", "4", "--stream-interval-ms", "0")
        async with MeshClient(broker_url) as client:
            await wait_for_workers(client, 1)

            async def collect(request: GenerateRequest, under_way: asyncio.Event, tokens_in: int) -> str:
                texts: list[str] = []
                received = 0
                async for chunk in client.generate(request):
                    texts.append(chunk.text)
                    received += len(chunk.token_ids)
                    if received >= tokens_in:
                        under_way.set()
                return "".join(texts)

            # Cut right after the submits (they may be lost on the way), or once a stream is 100 or
            # 1000 of its 1500+ tokens in: mid-stream however fast the machine runs them.
            for round_, tokens_in in enumerate((0, 100, 0, 1000)):
                requests = [_request(10 * round_ + i, 1500 + 100 * i) for i in range(5)]
                under_way = asyncio.Event()
                pending = [asyncio.create_task(collect(r, under_way, tokens_in)) for r in requests]
                if tokens_in:
                    await asyncio.wait_for(under_way.wait(), 10)
                else:
                    await asyncio.sleep(0.005)
                assert back.cut() == 1
                done = await asyncio.wait_for(asyncio.gather(*pending), 30)
                for request, text in zip(requests, done, strict=True):
                    assert text == await _expected_text(request), f"round {round_}"
            await _until(
                lambda: client.broker_info is not None and client.broker_info.inflight == 0,
                5,
                "requests are still counted in flight",
            )
            assert (await asyncio.wait_for(client.complete(_request(99, 5)), 10)).finish_reason is FinishReason.LENGTH


async def test_a_stream_with_a_frame_missing_is_never_passed_off_as_whole(
    processes: ProcessGroup, broker_url: str
) -> None:
    """Frames carry their number: a client that finds one missing (lost with a connection that was
    redialled) does not hand on a stream with a hole. It moves the request on (here, with migration
    off, it reports the loss) and cancels what is left of it on the worker."""
    processes.broker(broker_url)
    async with (
        hand_made_worker(broker_url, "gappy", "synthetic", capacity=4) as back,
        MeshClient(broker_url, migrate=False) as client,
    ):
        await wait_for_workers(client, 1)
        stream = client.generate(_request(0, 5))
        first = asyncio.ensure_future(anext(stream))
        _, request_id = parse_header((await recv(back))[0])
        for seq in (1, 2, 4):  # frame 3 lost on the way; the request still runs
            chunk = TokenChunk(f" word{seq}", [seq], seq=seq)
            back.send_multipart([pack_header(Kind.TOKENS, request_id), encode(chunk)])
        received = [await first]
        with pytest.raises(WorkerLostError, match="lost"):
            async for chunk in stream:
                received.append(chunk)
        assert [t for chunk in received for t in chunk.token_ids] == [1, 2]
        assert parse_header((await recv(back))[0]) == (Kind.CANCEL, request_id)


async def test_sigstop_is_dead_within_2s_and_rejoins_on_sigcont(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    frozen = processes.synthetic_worker(broker_url, "frozen", "--itl-ms", "20")
    processes.synthetic_worker(broker_url, "steady", "--itl-ms", "20")
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 2)
        # 50 tokens at 20 ms: the moved streams end about 2 s after SIGSTOP, well before ZMTP's heartbeat
        # (3 s) would close the frozen worker's connection and leave it no stale frame to send on SIGCONT.
        streams = [asyncio.create_task(client.complete(_request(i, 50))) for i in range(8)]
        await asyncio.sleep(0.5)
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        gone_after = await _until(
            lambda: [w.worker_id for w in client.workers()] == ["steady"], 5, "the stopped worker is still listed"
        )
        assert gone_after < 2.0, f"a stopped worker was treated as alive for {gone_after:.2f} s"
        # Its requests moved on; new work goes to the live worker only.
        done = await asyncio.wait_for(asyncio.gather(*streams), 30)
        assert {d.worker_id for d in done} == {"steady"}
        for i, d in enumerate(done):
            assert d.text == await _expected_text(_request(i, 50))
        assert time.monotonic() - stopped_at > 1.0
        frozen.signal(signal.SIGCONT)
        await _until(lambda: len(client.workers()) == 2, 10, "the resumed worker did not rejoin")
        # Its stale frames (for requests that moved on) were answered with CANCEL and counted.
        await _until(
            lambda: client.broker_info is not None and client.broker_info.dropped.get("stale", 0) > 0,
            5,
            "no stale frame was counted",
        )
        results = await asyncio.wait_for(asyncio.gather(*(client.complete(_request(i, 5)) for i in range(16))), 20)
        assert {r.worker_id for r in results} == {"frozen", "steady"}
        assert all(r.finish_reason is FinishReason.LENGTH for r in results)
        # Nothing of the old requests keeps running on it.
        await _until(lambda: all(w.inflight == 0 for w in client.workers()), 5, "stale requests still run")


async def test_broker_restart_under_load(processes: ProcessGroup, broker_url: str) -> None:
    broker = processes.broker(broker_url)
    workers = [processes.synthetic_worker(broker_url, name, "--itl-ms", "50") for name in ("w1", "w2")]
    async with MeshClient(broker_url) as client:
        await wait_for_workers(client, 2)
        inflight = [asyncio.create_task(client.complete(_request(i, 400))) for i in range(8)]
        await asyncio.sleep(0.5)
        broker.signal(signal.SIGKILL)
        broker.popen.wait()
        # Every in-flight request ends with a clear error; none hangs.
        outcomes = await asyncio.wait_for(asyncio.gather(*inflight, return_exceptions=True), 10)
        assert all(isinstance(o, BrokerUnavailableError | WorkerLostError) for o in outcomes), outcomes
        with pytest.raises(BrokerUnavailableError):
            await client.complete(_request(0, 2))
        old_start = client.broker_info.started_at if client.broker_info else 0.0
        processes.broker(broker_url)
        await _until(
            lambda: client.broker_info is not None and client.broker_info.started_at != old_start,
            20,
            "the new broker was never heard",
        )
        # Measured from the new broker's first beacon: each worker redials within its longest reconnect
        # interval, announces itself at its next heartbeat, and the broker's next beacon counts it.
        back_after = await _until(
            lambda: client.broker_info.workers == 2 and len(client.workers()) == 2, 10, "workers did not reconnect"
        )
        bound = RECONNECT_INTERVAL_MAX_S + 2 * HEARTBEAT_INTERVAL + 0.5
        assert back_after < bound, f"workers took {back_after:.2f} s to reconnect"
        done = await asyncio.wait_for(client.complete(_request(1, 5)), 10)
        assert done.finish_reason is FinishReason.LENGTH
    assert all(w.alive() for w in workers), "a worker exited"


async def test_a_client_that_stops_reading_stalls_no_one_and_memory_stays_bounded(
    processes: ProcessGroup, broker_url: str
) -> None:
    broker = processes.broker(broker_url)
    # A frame per token (no stream interval): the flood of frames this test needs to fill the queues.
    worker = processes.synthetic_worker(broker_url, "w1", "--capacity", "48", "--stream-interval-ms", "0")
    context = zmq.Context()
    stalled = context.socket(zmq.DEALER)
    try:
        async with MeshClient(broker_url) as client:
            await wait_for_workers(client, 1)
            await client.complete(_request(0, 5))
            rss_before = _rss_kib(broker.pid)
            # A client that submits 32 requests of 4000 tokens and never reads a frame: more than its socket
            # buffers and the broker's high-water mark (HIGH_WATER_MARK messages) can hold.
            stalled.setsockopt(zmq.RCVBUF, 64 * 1024)
            stalled.setsockopt(zmq.LINGER, 0)
            stalled.connect(Endpoints.from_url(broker_url).front)
            for i in range(32):
                body = GenerateRequest(model="synthetic", prompt=f"stall {i}", max_tokens=4000, seed=i)
                stalled.send_multipart([pack_header(Kind.SUBMIT, new_request_id()), b"synthetic", encode(body)])
            # Others are served meanwhile.
            for round_ in range(5):
                results = await asyncio.wait_for(
                    asyncio.gather(*(client.complete(_request(i, 20)) for i in range(8))), 15
                )
                assert all(r.usage.completion_tokens == 20 for r in results), round_
            # The broker hit the stalled client's high-water mark, gave up on it and cancelled its work.
            await _until(
                lambda: client.broker_info is not None and client.broker_info.dropped.get("client_gone", 0) > 0,
                30,
                "the broker never gave up on the stalled client",
            )
            await _until(lambda: all(w.inflight == 0 for w in client.workers()), 30, "the stalled requests still run")
            grown_mib = (_rss_kib(broker.pid) - rss_before) / 1024
            # Bounded by the high-water mark, not by 128k undelivered frames.
            assert grown_mib < 64, f"broker grew by {grown_mib:.0f} MiB"
            assert (await client.complete(_request(1, 5))).usage.completion_tokens == 5
    finally:
        stalled.close(linger=0)
        context.term()
    assert broker.alive() and worker.alive()


def _gateway_built() -> bool:
    cli = REPO_ROOT / "gateways" / "openai" / "cli.py"
    return "not built yet" not in cli.read_text()


@pytest.mark.skipif(not _gateway_built(), reason="the OpenAI gateway (gateways/openai) is still a stub")
async def test_gateway_answers_503_without_a_broker_and_recovers(processes: ProcessGroup, broker_url: str) -> None:
    import openai

    port = free_port()
    processes.mesh("gateway", "gateway", "openai", "--broker", broker_url, "--host", "127.0.0.1", "--port", str(port))
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=10)

    async def chat() -> str:
        reply = await api.chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        return reply.choices[0].message.content or ""

    async def status_without_broker() -> int | None:
        try:
            await chat()
        except openai.APIStatusError as exc:
            return exc.status_code
        except openai.APIConnectionError:
            return None  # the gateway is not listening yet
        return 200

    await _until_async(lambda: status_without_broker(), lambda s: s is not None, 30, "the gateway never answered")
    started = time.monotonic()
    assert await status_without_broker() == 503
    assert time.monotonic() - started < 5, "503 must come at once, not after a long wait"
    broker = processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    await _until_async(lambda: status_without_broker(), lambda s: s == 200, 30, "the gateway did not recover")
    assert await chat()
    broker.kill()
    await _until_async(lambda: status_without_broker(), lambda s: s == 503, 10, "no 503 after the broker died")
    processes.broker(broker_url)
    await _until_async(lambda: status_without_broker(), lambda s: s == 200, 30, "no recovery after a broker restart")
    await api.close()


async def _until_async(call, accept, timeout: float, message: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await call()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}: last {value!r}")
        await asyncio.sleep(0.2)
