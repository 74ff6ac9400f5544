"""relay: token frames per second through one broker, with and without coalescing.

This process plays both ends around a real `mesh broker`: a fake worker (a
DEALER on the back port, speaking mesh.protocol, announcing itself on the bus)
that blasts TOKENS frames with plain non-blocking sends, and a fake client (a
DEALER on the front) that submits the requests and drains the replies. Both
ends use non-blocking calls only, so the broker is the bottleneck. A window of
unreceived frames keeps every queue under its high-water mark (a full client
queue would make the broker abandon the request, as it should).

"Coalescing" is the worker's one-frame-per-engine-step rule: a frame carries
`tokens_per_frame` tokens, so tokens/s = frames/s x tokens_per_frame.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from bench.processes import ProcessGroup, StartupError, free_broker_url
from bench.profile import Profiler
from bench.report import SuiteResult, Target, plot_bars
from mesh import transport
from mesh.endpoints import Endpoints
from mesh.protocol import (
    Announcement,
    Done,
    FinishReason,
    GenerateRequest,
    Kind,
    TokenChunk,
    encode,
    new_request_id,
    pack_header,
    parse_header,
)
from mesh.security import SecurityConfig

MODEL = "relay-bench"
WORKER_ID = "relay-bench-worker"
#: Frames sent but not yet received: well under the sockets' high-water marks.
WINDOW = 4000
ANNOUNCE_EVERY_S = 0.2
FRAMES_TARGET = 100_000  # issue 2
TOKENS_TARGET = 150_000  # issue 6, coalesced


@dataclass(slots=True)
class RelayRun:
    tokens_per_frame: int
    streams: int
    frames: int
    seconds: float
    frames_per_s: float
    tokens_per_s: float
    frame_bytes: int
    lost: int
    #: Broker CPU (user + system) per relayed frame, and the frames/s one busy core would give:
    #: robust on a shared machine, where wall-clock throughput is not.
    broker_cpu_us_per_frame: float | None = None
    frames_per_broker_cpu_s: float | None = None
    #: The load generator's own CPU per frame (both ends, libzmq's I/O thread included): when it
    #: times frames_per_s nears 1e6 x cores left over, the generator, not the broker, is the limit.
    loadgen_cpu_us_per_frame: float | None = None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class _Ends:
    """The fake worker and fake client, with their sockets.

    The fake worker's heartbeat runs on its own thread (and PUB socket): a
    load generator starved by a busy machine must not look dead to the broker.
    """

    def __init__(self, broker_url: str) -> None:
        endpoints = Endpoints.from_url(broker_url)
        security = SecurityConfig()
        self.context = zmq.Context()
        self.worker = transport.connect(self.context, zmq.DEALER, endpoints.back, security, WORKER_ID.encode())
        self.client = transport.connect(self.context, zmq.DEALER, endpoints.front, security)
        self._bus_url = endpoints.bus_in
        self._started_at = time.time()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._announce_loop, name="relay-heartbeat", daemon=True)
        self._heartbeat.start()

    def _announce_loop(self) -> None:
        bus = transport.connect(self.context, zmq.PUB, self._bus_url, SecurityConfig())
        try:
            seq = 0
            while not self._stop.is_set():
                seq += 1
                announcement = Announcement(
                    worker_id=WORKER_ID,
                    models=[MODEL],
                    backend="relay-bench",
                    capacity=4096,
                    started_at=self._started_at,
                    seq=seq,
                )
                bus.send_multipart([pack_header(Kind.ANNOUNCE), encode(announcement)])
                self._stop.wait(ANNOUNCE_EVERY_S)
        finally:
            bus.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._heartbeat.join()
        for sock in (self.worker, self.client):
            sock.close(linger=0)
        self.context.term()

    def open_streams(self, count: int, timeout: float = 20.0) -> list[bytes]:
        """Submits `count` requests until the broker hands every one to the fake worker."""
        body = encode(GenerateRequest(model=MODEL, prompt="relay", max_tokens=1 << 30))
        deadline = time.monotonic() + timeout
        received: list[bytes] = []
        while len(received) < count:
            if time.monotonic() > deadline:
                raise StartupError(f"the broker dispatched {len(received)} of {count} relay requests")
            time.sleep(0.2)
            pending = [new_request_id() for _ in range(count - len(received))]
            for request_id in pending:
                self.client.send_multipart([pack_header(Kind.SUBMIT, request_id), MODEL.encode(), body])
            time.sleep(0.1)
            received += self._drain_submits()
            self._drain_client()  # model_not_found before the broker heard the announcement
        return received

    def _drain_submits(self) -> list[bytes]:
        ids = []
        while self.worker.poll(50, zmq.POLLIN):
            frames = self.worker.recv_multipart()
            kind, request_id = parse_header(frames[0])
            if kind is Kind.SUBMIT:
                ids.append(request_id)
        return ids

    def _drain_client(self) -> int:
        count = 0
        recv = self.client.recv_multipart
        try:
            while True:
                recv(zmq.NOBLOCK)
                count += 1
        except zmq.Again:
            return count


def blast(
    ends: _Ends, request_ids: list[bytes], tokens_per_frame: int, frames: int, max_seconds: float, broker_pid: int
) -> RelayRun:
    """Sends `frames` TOKENS frames round-robin over the requests and counts what the client receives."""
    cpu_before = cpu_seconds(broker_pid)
    own_before = cpu_seconds(os.getpid())
    chunk = TokenChunk(" tok" * tokens_per_frame, list(range(1000, 1000 + tokens_per_frame)))
    body = encode(chunk)
    messages = [[pack_header(Kind.TOKENS, rid), body] for rid in request_ids]
    # The C-level calls (see mesh.transport): the load generator must not be the bottleneck.
    send, worker = transport.send_nowait, ends.worker
    recv, client = transport.recv_nowait, ends.client
    sent = received = 0
    streams = len(messages)
    started = time.perf_counter()
    deadline = started + max_seconds
    while received < frames:
        # Send while the window allows (and the socket takes them).
        budget = min(WINDOW - (sent - received), frames - sent)
        try:
            for _ in range(budget):
                send(worker, messages[sent % streams])
                sent += 1
        except zmq.Again:
            pass
        # Then drain what came back.
        try:
            while True:
                recv(client)
                received += 1
        except zmq.Again:
            pass
        if sent - received >= WINDOW or sent >= frames:
            ends.client.poll(5, zmq.POLLIN)
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    # Settle: what is still in flight arrives or is counted lost.
    settle = time.monotonic() + 1.0
    while received < sent and time.monotonic() < settle:
        if ends.client.poll(20, zmq.POLLIN):
            received += ends._drain_client()
    cpu_after = cpu_seconds(broker_pid)
    own_after = cpu_seconds(os.getpid())
    frames_per_s = received / elapsed if elapsed > 0 else 0.0
    run = RelayRun(
        tokens_per_frame,
        streams,
        received,
        round(elapsed, 4),
        frames_per_s,
        frames_per_s * tokens_per_frame,
        len(body) + len(messages[0][0]),
        sent - received,
    )
    if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before and received:
        cpu = cpu_after - cpu_before
        run.broker_cpu_us_per_frame, run.frames_per_broker_cpu_s = cpu * 1e6 / received, received / cpu
    if own_before is not None and own_after is not None and received:
        run.loadgen_cpu_us_per_frame = (own_after - own_before) * 1e6 / received
    return run


def finish_streams(ends: _Ends, request_ids: list[bytes]) -> None:
    done = encode(Done(FinishReason.LENGTH, 1, 1, WORKER_ID))
    for request_id in request_ids:
        ends.worker.send_multipart([pack_header(Kind.DONE, request_id), done])
    time.sleep(0.1)
    ends._drain_client()


async def run(
    out: Path,
    *,
    frames: int,
    streams: int,
    coalesce: list[int],
    max_seconds: float,
    progress: bool = True,
    profile: bool = False,
) -> SuiteResult:
    from tqdm import tqdm

    params = {
        "frames": frames,
        "streams": streams,
        "tokens_per_frame": [1, *coalesce],
        "window": WINDOW,
        "max_seconds_per_run": max_seconds,
    }
    url = free_broker_url()
    runs: list[RelayRun] = []
    with ProcessGroup(out / "logs" / "relay") as group:
        broker = group.broker(url, "--log-level", "WARNING")
        await asyncio.sleep(0.3)
        if not broker.alive():
            raise StartupError(f"broker exited: {broker.tail()}")
        ends = _Ends(url)
        try:
            request_ids = ends.open_streams(streams)
            blast(ends, request_ids, 1, min(frames, 5000), max_seconds, broker.pid)  # warm-up
            profiler = Profiler(out)
            if profile:  # the uncoalesced run: the broker's per-frame cost
                profiler.start("relay-broker", broker.pid, min(max_seconds, 5))
            for tokens_per_frame in tqdm([1, *coalesce], desc="relay", disable=not progress, unit="run"):
                runs.append(blast(ends, request_ids, tokens_per_frame, frames, max_seconds, broker.pid))
            finish_streams(ends, request_ids)
            profiles = profiler.finish() if profile else {}
        finally:
            ends.close()
    single = runs[0]
    best = max(runs[1:], key=lambda r: r.tokens_per_s, default=single)
    summary = {
        "frames_per_s": round(single.frames_per_s),
        "tokens_per_s": round(best.tokens_per_s),
        "tokens_per_s_uncoalesced": round(single.tokens_per_s),
        "coalesced_tokens_per_frame": best.tokens_per_frame,
        "coalesced_frames_per_s": round(best.frames_per_s),
        "broker_cpu_us_per_frame": single.broker_cpu_us_per_frame,
        "frames_per_broker_cpu_s": round(single.frames_per_broker_cpu_s or 0),
        "loadgen_cpu_us_per_frame": single.loadgen_cpu_us_per_frame,
    }
    if profiles:
        summary["profiles"] = profiles
    targets = [
        Target(
            "relay frames/s (1 token per frame)",
            f">= {FRAMES_TARGET:,}",
            summary["frames_per_s"],
            summary["frames_per_s"] >= FRAMES_TARGET,
        ),
        Target(
            f"relay tokens/s ({best.tokens_per_frame} tokens per frame)",
            f">= {TOKENS_TARGET:,}",
            summary["tokens_per_s"],
            summary["tokens_per_s"] >= TOKENS_TARGET,
        ),
    ]
    plot_bars(
        out,
        "relay",
        "broker relay: tokens/s by tokens per frame",
        [f"{r.tokens_per_frame}/frame" for r in runs],
        [r.tokens_per_s for r in runs],
        "tokens/s",
    )
    return SuiteResult("relay", params=params, results=runs, summary=summary, targets=targets)
