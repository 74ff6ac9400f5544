"""A fuzzer against the broker's four ports and, through the broker, a worker: 10k bad messages.

Random and mutated frames (wrong frame counts, bad msgpack, wrong types, huge sizes, unknown
versions, unknown kinds, replayed request ids) go to front, back, bus_in and bus_out while a real
client keeps asking for completions. SUBMITs with a valid header and model name but a broken body
pass the broker (it reads headers only) and reach the worker, which must answer bad_request.
The worker runs the SYNTHETIC engine (fake tokens): this is about parsing, not a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import msgspec
import zmq

from mesh.client import MeshClient
from mesh.endpoints import Endpoints
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Announcement,
    GenerateRequest,
    Kind,
    encode,
    new_request_id,
    pack_header,
)
from tests.support import ProcessGroup, wait_for_workers

TOTAL_MESSAGES = 10_000
SEED = 20261122
MODEL = "synthetic"


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """One random edit: flip, cut, extend, duplicate or replace."""
    if not data:
        return rng.randbytes(rng.randint(1, 32))
    choice = rng.randrange(5)
    at = rng.randrange(len(data))
    if choice == 0:
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    if choice == 1:
        return data[:at]
    if choice == 2:
        return data + rng.randbytes(rng.randint(1, 64))
    if choice == 3:
        return data[:at] + data[at:] * 2
    return rng.randbytes(len(data))


def _wrongly_typed_body(rng: random.Random) -> bytes:
    """A msgpack map with GenerateRequest's field names and values of the wrong type."""
    junk: list[object] = [None, -1, 2**62, 1.5e308, float("nan"), "x" * rng.randint(0, 50), [1, "a"], {"k": 1}, True]
    fields = [
        "model",
        "prompt",
        "messages",
        "prompt_token_ids",
        "max_tokens",
        "temperature",
        "stop",
        "resume_token_ids",
        "seed",
        "logprobs",
        "unknown_field",
    ]
    body = {name: rng.choice(junk) for name in rng.sample(fields, rng.randint(1, len(fields)))}
    return msgspec.msgpack.encode(body)


def _silly_but_valid_body(rng: random.Random) -> bytes:
    """Well-typed requests with odd values: the worker must refuse or serve them, never crash."""
    request = GenerateRequest(
        model=MODEL,
        prompt=rng.choice(["", "hi", "\x00\uffff", "word " * 50]),
        max_tokens=rng.choice([-5, 0, 1, 3, 10**9]),
        temperature=rng.choice([0.0, -1.0, float("inf")]),
        top_k=rng.choice([-1, 0, 5]),
        stop=rng.choice([[], [""], ["a" * 1000]]),
        seed=rng.choice([None, -1, 2**63 - 1]),
        resume_token_ids=rng.choice([[], [0, 1, 2], [10**6]]),
    )
    return encode(request)


def fuzz_frames(rng: random.Random, port: str, replay: list[bytes]) -> list[bytes]:
    """One malformed (or hostile) message for `port`."""
    kind = rng.choice(list(Kind))
    request_id = rng.choice(replay) if replay and rng.random() < 0.3 else new_request_id()
    header = pack_header(kind, request_id)
    roll = rng.random()
    if roll < 0.08:
        return [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))]  # any frame count
    if roll < 0.14:
        return [bytes((rng.choice([0, 2, 255]), kind)) + request_id, MODEL.encode(), b"\x80"]  # unknown version
    if roll < 0.18:
        return [bytes((PROTOCOL_VERSION, rng.choice([0, 10, 200]))) + request_id, b"x"]  # unknown kind
    if roll < 0.22:
        return [_mutate(rng, header), MODEL.encode(), _mutate(rng, encode(GenerateRequest(model=MODEL)))]
    if roll < 0.225:
        return [header, rng.randbytes(rng.randint(256 * 1024, 1024 * 1024))]  # big
    if port == "front":
        if roll < 0.55:  # reaches the worker: a valid header and model, a broken body
            body = rng.choice(
                [_wrongly_typed_body(rng), _mutate(rng, encode(GenerateRequest(model=MODEL))), b"\xc1", b""]
            )
            frames = [pack_header(Kind.SUBMIT, request_id), MODEL.encode(), body]
            replay.append(request_id)
            return frames
        if roll < 0.7:
            frames = [pack_header(Kind.SUBMIT, request_id), MODEL.encode(), _silly_but_valid_body(rng)]
            replay.append(request_id)
            return frames
        if roll < 0.8:
            return [pack_header(Kind.CANCEL, request_id)]
        if roll < 0.85:
            return [pack_header(Kind.SUBMIT, request_id), rng.randbytes(8), b"x"]  # model name not UTF-8
        return [header, *(rng.randbytes(8) for _ in range(rng.randint(0, 4)))]
    if port == "back":  # a fake worker: replies for requests it never got, odd kinds, BYE
        if roll < 0.6:
            body = rng.choice([b"\x92\xa1x\x90", _mutate(rng, b"\x93\x00\x01\xa1w"), b""])
            return [pack_header(rng.choice([Kind.TOKENS, Kind.DONE, Kind.ERROR]), request_id), body]
        if roll < 0.65:
            return [pack_header(Kind.BYE)]
        return [header, rng.randbytes(rng.randint(0, 16))]
    if port == "bus_in":  # announcements that lie or do not parse
        if roll < 0.6:
            bad = Announcement(
                worker_id=rng.choice(["", "ghost"]),
                models=rng.choice([[], [MODEL]]),
                backend="fuzz",
                capacity=rng.choice([0, -3, 1]),
            )
            return [pack_header(Kind.ANNOUNCE), _mutate(rng, encode(bad)) if rng.random() < 0.5 else encode(bad)]
        return [pack_header(Kind.ANNOUNCE), rng.randbytes(rng.randint(0, 64))]
    # bus_out (XPUB): subscriptions and garbage
    return [rng.choice([b"\x01", b"\x00", b"\x02"]) + rng.randbytes(rng.randint(0, 8))]


async def test_fuzz_10k_messages_crash_nothing_and_traffic_flows(processes: ProcessGroup, broker_url: str) -> None:
    broker = processes.broker(broker_url)
    worker = processes.synthetic_worker(broker_url, "w1", "--capacity", "32")
    endpoints = Endpoints.from_url(broker_url)
    rng = random.Random(SEED)
    ctx = zmq.Context()
    sockets: dict[str, zmq.Socket] = {}
    try:
        for port, kind, endpoint in (
            ("front", zmq.DEALER, endpoints.front),
            ("back", zmq.DEALER, endpoints.back),
            ("bus_in", zmq.PUB, endpoints.bus_in),
            ("bus_out", zmq.XSUB, endpoints.bus_out),
        ):
            sock = sockets[port] = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            if port == "back":
                sock.setsockopt(zmq.IDENTITY, b"fuzz-worker")
            sock.connect(endpoint)
        async with MeshClient(broker_url) as client:
            await wait_for_workers(client, 1)
            stop = asyncio.Event()
            served: list[float] = []

            async def valid_traffic() -> None:
                i = 0
                while not stop.is_set():
                    done = await asyncio.wait_for(
                        client.complete(GenerateRequest(model=MODEL, prompt=f"ok {i}", max_tokens=3, seed=i)), 10
                    )
                    assert done.usage.completion_tokens == 3
                    served.append(time.monotonic())
                    i += 1

            traffic = asyncio.create_task(valid_traffic())
            replay: list[bytes] = []
            plan = ["front"] * 4500 + ["back"] * 2500 + ["bus_in"] * 2000 + ["bus_out"] * 1000
            rng.shuffle(plan)
            assert len(plan) == TOTAL_MESSAGES
            started = time.monotonic()
            for n, port in enumerate(plan):
                sockets[port].send_multipart(fuzz_frames(rng, port, replay), copy=False)
                if n % 500 == 0:
                    _drain(sockets["front"])
                    _drain(sockets["back"])
                    replay[:] = replay[-50:]
                    # Valid traffic must keep flowing while the fuzz goes on: a new completion per 500 messages.
                    target = len(served) + 1
                    deadline = time.monotonic() + 10
                    while len(served) < target:
                        assert time.monotonic() < deadline, f"valid traffic stalled after {n} fuzz messages"
                        await asyncio.sleep(0.005)
            # Frames beyond the size limit: the broker drops the connection, not itself.
            for port in ("front", "back"):
                oversized = b"x" * (MAX_MESSAGE_BYTES + 1)
                sockets[port].send_multipart([pack_header(Kind.SUBMIT, new_request_id()), oversized])
            fuzz_seconds = time.monotonic() - started
            during = len(served)
            await asyncio.sleep(1.0)
            _drain(sockets["front"])
            stop.set()
            await asyncio.wait_for(traffic, 15)
            assert broker.alive() and worker.alive()
            # Valid traffic flowed during and after.
            assert during >= TOTAL_MESSAGES // 500, f"{during} valid requests during {fuzz_seconds:.1f} s of fuzzing"
            after = [
                await asyncio.wait_for(client.complete(GenerateRequest(model=MODEL, prompt="after", max_tokens=4)), 10)
                for _ in range(5)
            ]
            assert all(a.usage.completion_tokens == 4 and a.worker_id == "w1" for a in after)
            # A well-formed lie ("ghost" announcing a model) is accepted on a mesh without CURVE, but it never
            # answers: it got no request above, and it expires with its missing heartbeats.
            deadline = time.monotonic() + 5
            while [w.worker_id for w in client.workers()] != ["w1"]:
                assert time.monotonic() < deadline, f"fuzzed workers linger: {client.workers()}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.6)  # the next beacon carries the counters
            dropped = client.broker_info.dropped if client.broker_info else {}
            assert dropped.get("malformed", 0) > 1000, dropped
            assert dropped.get("stale", 0) > 0, dropped
    finally:
        for sock in sockets.values():
            sock.close(linger=0)
        ctx.term()
    assert "Traceback" not in broker.output() and "Traceback" not in worker.output()


def _drain(sock: zmq.Socket) -> None:
    """Reads (and ignores) the replies, so our own socket never fills."""
    with contextlib.suppress(zmq.Again):
        while True:
            sock.recv_multipart(zmq.NOBLOCK)
