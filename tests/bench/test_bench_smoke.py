"""Smoke test of `python -m bench`: the relay, overhead and timeline suites run end to end and name their figures.

Tiny counts (--smoke): this checks the tooling, never the speed (speed targets live in bench/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import timeline
from mesh.cpu_latency import PM_QOS_DEVICE, current_cpu_latency
from tests.support import ProcessGroup, mesh_env


def run_bench(processes: ProcessGroup, out: Path, *argv: str) -> dict:  # type: ignore[type-arg]
    bench = processes.start(
        argv[0], [sys.executable, "-m", "bench", *argv, "--smoke", "--no-progress", "--out", str(out)], env=mesh_env()
    )
    try:
        code = bench.popen.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bench {argv[0]} still running after 90 s:\n{bench.output()}")
    assert code == 0, bench.output()
    return json.loads((out / f"{argv[0]}.json").read_text())


def test_relay_reports_frames_and_tokens_per_second(processes: ProcessGroup, tmp_path: Path) -> None:
    result = run_bench(processes, tmp_path, "relay")
    assert result["status"] == "ok", result.get("skipped")
    assert result["summary"]["frames_per_s"] > 0
    assert result["summary"]["tokens_per_s"] > result["summary"]["frames_per_s"]  # coalesced frames carry more
    runs = result["results"]
    assert [r["tokens_per_frame"] for r in runs] == [1, 4, 16]
    assert all(r["lost"] == 0 and r["frames"] > 0 for r in runs)
    assert (tmp_path / "relay.png").stat().st_size > 0


def test_overhead_reports_added_ttft_per_layer(processes: ProcessGroup, tmp_path: Path) -> None:
    result = run_bench(processes, tmp_path, "overhead")
    assert result["status"] == "ok", result.get("skipped")
    added = result["summary"]["added_ttft_ms"]
    assert {"p50", "p99"} <= set(added)
    assert added["p99"] >= added["p50"] - 1.0  # loose: a sanity check on the arithmetic, not a speed target
    layers = result["results"]
    assert {"engine", "mesh", "gateway", "floor"} <= set(layers)
    floor = result["summary"]["floor_ttft_ms"]
    assert 0 < floor["p50"] <= floor["p99"]
    above = result["summary"]["above_floor_ttft_ms"]
    assert above["p50"] == pytest.approx(layers["gateway"][0]["ttft_ms"]["p50"] - floor["p50"], abs=1e-3)
    for series in layers.values():
        for level in series:
            assert level["errors"] == 0 and level["requests"] > 0
            assert level["ttft_ms"]["p50"] is not None and level["e2e_ms"]["p99"] is not None
    for png in ("overhead_latency.png", "overhead_throughput.png"):
        assert (tmp_path / png).stat().st_size > 0


@pytest.mark.skipif(not os.access(PM_QOS_DEVICE, os.R_OK | os.W_OK), reason=f"no access to {PM_QOS_DEVICE}")
def test_a_suite_runs_under_the_cpu_latency_it_is_given_and_records_it(processes: ProcessGroup, tmp_path: Path) -> None:
    before = current_cpu_latency()
    assert before is not None
    if before <= 7:
        pytest.skip(f"something else already holds the CPU latency at {before} us")
    result = run_bench(processes, tmp_path, "roundtrip", "--cpu-latency-us", "7")
    assert result["status"] == "ok", result.get("skipped")
    assert result["machine"]["cpu_idle"]["pm_qos_cpu_latency_us"] == 7
    assert current_cpu_latency() == before


def test_timeline_lays_each_requests_events_from_every_process_in_causal_order(
    processes: ProcessGroup, tmp_path: Path
) -> None:
    result = run_bench(processes, tmp_path, "timeline")
    assert result["status"] == "ok", result.get("skipped")
    at = {e["event"]: e["median_us"] for e in result["summary"]["events"]}
    # Each step follows the one before it in every request, so their medians keep that order too.
    path = [
        "gateway: HTTP bytes in",
        "gateway: zmq send SUBMIT",
        "broker: zmq recv SUBMIT",
        "worker: zmq recv SUBMIT",
        "worker: request task runs",
        "worker: zmq send TOKENS",
        "broker: zmq recv TOKENS",
        "gateway: zmq recv TOKENS",
        "gateway: HTTP bytes out",
        timeline.FIRST_TOKEN,
    ]
    assert [at.get(event) for event in path] == sorted(at[event] for event in path), at
    assert result["summary"]["ttft_p50_us"] == at[timeline.FIRST_TOKEN] > 0


def test_timeline_takes_each_events_first_occurrence_per_request() -> None:
    # Two requests sent at 0 and 10,000 ns, first tokens at 5,000 and 16,000 ns.
    events = [
        (1_000, "gateway: in"),
        (2_000, "worker: send"),
        (3_000, "worker: send"),  # a second frame: not the first occurrence
        (11_000, "gateway: in"),
        (13_000, "worker: send"),
        (14_000, "broker: once"),  # in one request of two: under the share reported
        (17_000, "worker: send"),  # after the first token: not on its path
    ]
    rows = timeline.lay_out(events, [(0, 5_000), (10_000, 16_000)])
    assert rows == [("gateway: in", 1.0), ("worker: send", 2.5), (timeline.FIRST_TOKEN, 5.5)]
