"""timeline: where one request's time to first token goes, process by process.

The suite starts the synthetic mesh (broker, one synthetic worker, the OpenAI
gateway: fake tokens with no delay, so only the mesh's own cost is measured)
with every process launched through `python -m bench.timeline probe DIR
MESH-ARGS...`. That runs the ordinary `mesh` command with probes on its hot
path:

    every process   each ZeroMQ message sent and received, by kind (mesh.transport)
    gateway         the request's bytes arriving, and each write of response bytes (aiohttp)
    worker          the request's task starting to run

A probe appends (CLOCK_MONOTONIC nanoseconds, label) to a list, about a
microsecond; the list is written to DIR when the process exits. CLOCK_MONOTONIC
is one clock for every process on the machine, so the suite can lay each
request's events from all processes on one time line: it sends requests one
at a time with the minimal HTTP client (bench.rawhttp) and reports, per event,
the median time since the client sent the request, up to the first token's
arrival. The production code carries no probes: they are installed here, by
replacing functions before the command runs, and cost nothing elsewhere.

    python -m bench timeline --requests 2000
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.load import HttpTarget, Timing
from bench.mesh_stack import SYNTHETIC_MODEL, start_synthetic_mesh
from bench.rawhttp import RawHttpPool, raw_http_requester
from bench.report import SuiteResult, markdown_table, skipped

#: The client's own event: the first token's bytes read (every other event belongs to a mesh process).
FIRST_TOKEN = "client: first token read"
#: An event is reported when it shows up in this share of the requests (a second frame may not).
MIN_SHARE = 0.9
WARM_UP_REQUESTS = 200


# ---------------------------------------------------------------------- probes (in each mesh process)


class _Recorder:
    def __init__(self, role: str) -> None:
        self.role = role
        self.events: list[tuple[int, str]] = []
        self.clock = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux

    def mark(self, label: str) -> None:
        self.events.append((self.clock(), label))

    def dump(self, folder: Path) -> None:
        lines = "".join(f"{t}\t{self.role}: {label}\n" for t, label in self.events)
        (folder / f"{self.role}-{os.getpid()}.tsv").write_text(lines)


def _kind_names() -> Callable[[list[bytes]], str]:
    from mesh.protocol import Kind, parse_header

    def kind_of(frames: list[bytes]) -> str:
        # A ROUTER's message starts with the peer's identity: the header is the first frame that parses.
        for frame in frames[:2]:
            try:
                kind, _ = parse_header(frame)
            except ValueError:
                continue
            return Kind(kind).name
        return "?"

    return kind_of


def _install_probes(recorder: _Recorder) -> None:
    from mesh import transport

    kind_of = _kind_names()
    mark = recorder.mark
    send, recv = transport.send_nowait, transport.recv_nowait

    def send_nowait(sock: Any, frames: list[bytes]) -> None:
        kind = kind_of(frames)
        mark(f"zmq send {kind}")
        send(sock, frames)
        mark(f"zmq sent {kind}")

    def recv_nowait(sock: Any) -> list[bytes]:
        frames = recv(sock)
        mark(f"zmq recv {kind_of(frames)}")
        return frames

    transport.send_nowait, transport.recv_nowait = send_nowait, recv_nowait

    if recorder.role == "gateway":
        from aiohttp import http_writer, web_protocol

        data_received = web_protocol.RequestHandler.data_received
        write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

        def on_data(self: Any, data: bytes) -> None:
            mark("HTTP bytes in")
            data_received(self, data)

        def on_write(self: Any, chunk: Any) -> None:
            mark("HTTP bytes out")
            write(self, chunk)

        def on_writelines(self: Any, chunks: Any) -> None:
            mark("HTTP bytes out")
            writelines(self, chunks)

        web_protocol.RequestHandler.data_received = on_data  # type: ignore[method-assign]
        http_writer.StreamWriter._write = on_write  # type: ignore[method-assign]
        http_writer.StreamWriter._writelines = on_writelines  # type: ignore[method-assign]

    if recorder.role == "worker":
        from mesh.worker import Worker

        serve = Worker._serve

        async def on_serve(self: Worker, request_id: bytes, request: Any) -> None:
            mark("request task runs")
            await serve(self, request_id, request)

        Worker._serve = on_serve  # type: ignore[method-assign]


def probe_main(argv: Sequence[str]) -> int:
    """`probe DIR MESH-ARGS...`: the mesh command MESH-ARGS, its events written to DIR at exit."""
    folder, mesh_args = Path(argv[0]), list(argv[1:])
    recorder = _Recorder(mesh_args[0])  # broker, worker or gateway
    _install_probes(recorder)
    atexit.register(recorder.dump, folder)
    from mesh.cli import main

    return main(mesh_args)


def probe_command(folder: Path) -> tuple[str, ...]:
    """What starts a mesh command with probes (in place of bench.processes.MESH_CLI)."""
    return (sys.executable, "-m", "bench.timeline", "probe", str(folder))


# ---------------------------------------------------------------------- the suite


def lay_out(
    events: Sequence[tuple[int, str]], requests: Sequence[tuple[int, int]], min_share: float = MIN_SHARE
) -> list[tuple[str, float]]:
    """(event, median microseconds since the request was sent), in time order, up to the first token.

    `events`: (ns, label) from every process, any order. `requests`: (sent ns, first token ns), sent
    one at a time: an event belongs to the last request sent before it, and only its first
    occurrence there counts (later frames of the stream repeat the labels)."""
    ordered = sorted(events)
    offsets: dict[str, list[float]] = {}
    cursor = 0
    # Each request's window ends where the next one begins (the last one's, a second after its first token).
    ends = [sent for sent, _ in requests[1:]] + [first_token + 10**9 for _, first_token in requests[-1:]]
    for (sent, first_token), end in zip(requests, ends, strict=True):
        while cursor < len(ordered) and ordered[cursor][0] < sent:
            cursor += 1
        seen: set[str] = set()
        position = cursor
        while position < len(ordered) and ordered[position][0] < min(end, first_token):
            at, label = ordered[position]
            if label not in seen:
                seen.add(label)
                offsets.setdefault(label, []).append((at - sent) / 1000)
            position += 1
        offsets.setdefault(FIRST_TOKEN, []).append((first_token - sent) / 1000)
    wanted = min_share * len(requests)
    rows = [(label, statistics.median(xs)) for label, xs in offsets.items() if len(xs) >= wanted]
    return sorted(rows, key=lambda row: row[1])


def _read_events(folder: Path) -> list[tuple[int, str]]:
    events = []
    for path in folder.glob("*.tsv"):
        for line in path.read_text().splitlines():
            at, label = line.split("\t", 1)
            events.append((int(at), label))
    return events


async def run(out: Path, requests: int, max_tokens: int, progress: bool) -> SuiteResult:
    from tqdm import tqdm

    params = {"requests": requests, "max_tokens": max_tokens, "engine": "synthetic, no delay (fake tokens)"}
    folder = out / "timeline-events"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tsv"):
        stale.unlink()
    sent: list[tuple[int, int]] = []
    mesh = await start_synthetic_mesh(out / "logs" / "timeline", 1, gateway=True, cli=probe_command(folder))
    with mesh.group:
        if mesh.gateway_url is None:
            return skipped("timeline", mesh.gateway_skipped or "the gateway did not start", params)
        pool = RawHttpPool(mesh.gateway_url)
        one = raw_http_requester(pool, HttpTarget(mesh.gateway_url, SYNTHETIC_MODEL), max_tokens)
        try:
            for measured in [False] * WARM_UP_REQUESTS + [True] * requests:
                timing = Timing(start=time.perf_counter())
                await one(timing)
                if timing.error is not None:
                    raise RuntimeError(f"a request failed: {timing.error}")
                if measured:
                    sent.append((round(timing.start * 1e9), round(timing.arrivals[0] * 1e9)))
        finally:
            await pool.close()
        if progress:
            tqdm.write(f"timeline: {requests} requests sent; stopping the mesh to collect its events")
    # Leaving the group stopped every process: each wrote its events on the way out.
    rows = lay_out(_read_events(folder), sent)
    previous = [0.0, *(at for _, at in rows[:-1])]
    table = [[label, f"{at:.0f}", f"{at - before:+.0f}"] for (label, at), before in zip(rows, previous, strict=True)]
    text = markdown_table(["event", "median µs since sent", "step"], table)
    (out / "timeline.md").write_text(text + "\n")
    print(text)
    summary = {
        "ttft_p50_us": dict(rows).get(FIRST_TOKEN),
        "events": [{"event": label, "median_us": at} for label, at in rows],
    }
    return SuiteResult("timeline", params=params, summary=summary)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "probe":
        print("usage: python -m bench.timeline probe DIR MESH-ARGS...  (the suite: python -m bench timeline)")
        return 2
    return probe_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
