"""The `mesh` command line as a user runs it: real processes, synthetic workers (fake tokens)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from mesh.cli import build_parser
from tests.support import ProcessGroup, mesh_env, wait_until

MESH = [sys.executable, "-m", "mesh.cli"]


def mesh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESH, *args], capture_output=True, text=True, timeout=timeout, env=mesh_env())


def status(broker_url: str) -> dict:  # type: ignore[type-arg]
    result = mesh("status", "--broker", broker_url, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _commands(parser, prefix=()):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_command_and_flag_has_help() -> None:
    parser = build_parser()
    commands = list(_commands(parser))
    assert {("broker",), ("worker",), ("status",), ("generate",)} <= set(commands)
    for command in commands:
        sub = parser
        for name in command:
            sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"mesh {' '.join(command)} {action.option_strings[0]} has no help"
    result = mesh("worker", "--help")
    assert result.returncode == 0 and "synthetic" in result.stdout and "chat template" in result.stdout


def test_status_follows_workers_and_generate_keeps_answering(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    started = time.monotonic()
    first = processes.synthetic_worker(broker_url, "w1")
    processes.synthetic_worker(broker_url, "w2")
    wait_until(lambda: len(status(broker_url)["workers"]) == 2, timeout=10, message="two workers listed")
    assert time.monotonic() - started < 10
    snapshot = status(broker_url)
    assert snapshot["broker"]["endpoints"]["front"] == broker_url
    worker = snapshot["workers"][0]
    for key in ("id", "models", "backend", "inflight", "capacity", "tokens_per_s"):
        assert key in worker
    assert {w["id"] for w in snapshot["workers"]} == {"w1", "w2"}

    failures: list[str] = []
    stop = threading.Event()

    def keep_generating() -> None:
        while not stop.is_set():
            result = mesh("generate", "--broker", broker_url, "--model", "synthetic", "--max-tokens", "3", "hi")
            if result.returncode != 0 or not result.stdout.strip():
                failures.append(result.stderr)

    generator = threading.Thread(target=keep_generating)
    generator.start()
    try:
        time.sleep(0.5)
        first.signal(signal.SIGKILL)
        took = wait_until(lambda: [w["id"] for w in status(broker_url)["workers"]] == ["w2"], timeout=5)
        # Detection (1.5 s of missed heartbeats) plus one `mesh status` process start-up.
        assert took < 2.0 + 1.5, took
        time.sleep(0.5)
    finally:
        stop.set()
        generator.join()
    assert not failures, failures


def test_generate_reports_errors_on_one_line(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    wait_until(lambda: len(status(broker_url)["workers"]) == 1, timeout=10)
    time.sleep(0.7)  # past the broker's warm-up
    result = mesh("generate", "--broker", broker_url, "--model", "nope", "hello")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "model_not_found" in result.stderr
    ok = mesh("generate", "--broker", broker_url, "--model", "synthetic", "--seed", "5", "--max-tokens", "6", "hi")
    again = mesh("generate", "--broker", broker_url, "--model", "synthetic", "--seed", "5", "--max-tokens", "6", "hi")
    assert ok.returncode == 0 and len(ok.stdout.split()) == 6 and ok.stdout == again.stdout


def test_no_broker_is_a_clear_error() -> None:
    result = mesh("status", "--broker", "tcp://127.0.0.1:9", "--timeout", "0.5")
    assert result.returncode == 1 and "no broker answered" in result.stderr
    bad = mesh("status", "--broker", "http://nowhere")
    assert bad.returncode == 2 and "tcp://HOST:PORT" in bad.stderr


def test_non_loopback_bind_needs_keys_or_insecure() -> None:
    result = mesh("broker", "--broker", "tcp://0.0.0.0:21901")
    assert result.returncode == 2 and "--insecure" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("drain_timeout", ["10"])
def test_sigterm_drains_in_flight_requests(processes: ProcessGroup, broker_url: str, drain_timeout: str) -> None:
    processes.broker(broker_url)
    worker = processes.synthetic_worker(broker_url, "w1", "--itl-ms", "50", "--drain-timeout", drain_timeout)
    wait_until(lambda: len(status(broker_url)["workers"]) == 1, timeout=10)
    generate = subprocess.Popen(
        [*MESH, "generate", "--broker", broker_url, "--model", "synthetic", "--max-tokens", "30", "hi"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mesh_env(),
    )
    try:
        wait_until(lambda: status(broker_url)["workers"][0]["inflight"] == 1, timeout=10)
        worker.signal(signal.SIGTERM)
        out, err = generate.communicate(timeout=20)
    finally:
        generate.kill()
    assert generate.returncode == 0, err
    assert len(out.split()) == 30  # the in-flight request finished
    assert worker.popen.wait(10) == 0
    wait_until(lambda: status(broker_url)["workers"] == [], timeout=3, message="worker gone after BYE")


def test_cpu_lists() -> None:
    from mesh.cli_options import cpu_list

    assert cpu_list("0") == {0}
    assert cpu_list("0,2-3") == {0, 2, 3}
    for bad in ("", "x", "3-x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)


def test_cpus_keeps_every_thread_of_the_process_on_those_cpus(processes: ProcessGroup, broker_url: str) -> None:
    import os
    from pathlib import Path

    cpu = max(os.sched_getaffinity(0))
    broker = processes.broker(broker_url, "--cpus", str(cpu))
    processes.synthetic_worker(broker_url, "w1")
    assert mesh("generate", "--broker", broker_url, "--model", "synthetic", "hi").returncode == 0
    threads = [int(t.name) for t in Path(f"/proc/{broker.pid}/task").iterdir()]
    assert len(threads) >= 2  # the main thread and ZeroMQ's I/O thread, at least
    assert all(os.sched_getaffinity(tid) == {cpu} for tid in threads)
    bad = mesh("broker", "--broker", broker_url, "--cpus", "4096")
    assert bad.returncode == 2 and "Invalid argument" in bad.stderr
