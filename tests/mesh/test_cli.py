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

from mesh.broker import warm_up_seconds
from mesh.cli import build_parser
from mesh.discovery import HEARTBEAT_INTERVAL
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
    for key in ("id", "models", "backend", "inflight", "capacity", "tokens_per_s", "request_tokens_per_s"):
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
        # Detection (1.5 s of missed heartbeats) plus `mesh status` process start-ups, on 2 cores shared
        # with the `mesh generate` processes above (detection itself is timed in process in test_faults).
        assert took < 6.0, took
        time.sleep(0.5)
    finally:
        stop.set()
        generator.join()
    assert not failures, failures


def test_generate_reports_errors_on_one_line(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "w1")
    wait_until(lambda: len(status(broker_url)["workers"]) == 1, timeout=10)
    time.sleep(warm_up_seconds(HEARTBEAT_INTERVAL))  # past the broker's warm-up
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=mesh_env(),
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
    from mesh.cli_options import cpu_list, cpu_list_text

    assert cpu_list("0") == {0}
    assert cpu_list("0,2-3") == {0, 2, 3}
    for bad in ("", "x", "3-x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)
    assert cpu_list_text(cpu_list("5,0-2,4,7")) == "0-2,4-5,7"


def test_port_numbers() -> None:
    from mesh.cli_options import port_number

    assert port_number("1") == 1 and port_number("65535") == 65535
    for bad in ("0", "65536", "-1", "99999", "http", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="1 to 65535"):
            port_number(bad)


def test_cpus_keeps_every_thread_of_the_process_on_those_cpus(processes: ProcessGroup, broker_url: str) -> None:
    import os
    from pathlib import Path

    from mesh.cli_options import cpu_list_text

    cpu = max(os.sched_getaffinity(0))
    broker = processes.broker(broker_url, "--cpus", str(cpu))
    processes.synthetic_worker(broker_url, "w1")
    # `mesh generate` does not wait for a worker: one started with the broker may be heard after its warm-up.
    wait_until(lambda: len(status(broker_url)["workers"]) == 1, timeout=30)
    assert mesh("generate", "--broker", broker_url, "--model", "synthetic", "hi").returncode == 0
    threads = [int(t.name) for t in Path(f"/proc/{broker.pid}/task").iterdir()]
    assert len(threads) >= 2  # the main thread and ZeroMQ's I/O thread, at least
    assert all(os.sched_getaffinity(tid) == {cpu} for tid in threads)
    available = cpu_list_text(os.sched_getaffinity(0))
    bad = mesh("broker", "--broker", broker_url, "--cpus", "4096")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "--cpus 4096: this process cannot run on CPU 4096;" in bad.stderr
    assert f"CPUs available to it: {available}" in bad.stderr
    # One usable CPU among them: the kernel would quietly drop the others.
    partly = mesh("status", "--broker", broker_url, "--cpus", f"{cpu},4095-4096")
    assert partly.returncode == 2 and "cannot run on CPUs 4095-4096;" in partly.stderr, partly.stderr


def _parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """argparse's error line for argv (it exits 2 before anything runs)."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_ports_seeds_and_dtypes_stop_at_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, flag in [
        (("up", "--api-port", "99999", "--no-ui"), "--api-port"),
        (("up", "--api-port", "-1"), "--api-port"),
        (("up", "--ui-port", "0"), "--ui-port"),
        (("up", "--ui-port", "http"), "--ui-port"),
        (("gateway", "gradio", "--port", "65536"), "--port"),
        (("generate", "--model", "m", "--seed", "99999999999999999999999", "hi"), "--seed"),
        (("generate", "--model", "m", "--seed", str(-(2**63) - 1), "hi"), "--seed"),
        (("worker", "--seed", str(2**63)), "--seed"),
        (("worker", "--dtype", "bogus"), "--dtype"),
        (("generate", "--model", "m", "--max-tokens", "99999999999999999999", "hi"), "--max-tokens"),
        (("worker", "--capacity", str(2**31)), "--capacity"),
    ]:
        error = _parse_error(capsys, *argv)
        assert error.startswith("mesh ") and f"argument {flag}" in error, (argv, error)
    args = build_parser().parse_args(["generate", "--model", "m", "--seed", str(-(2**63)), "hi"])
    assert args.seed == -(2**63)
    args = build_parser().parse_args(["up", "--api-port", "1", "--ui-port", "65535"])
    assert (args.api_port, args.ui_port) == (1, 65535)
    assert build_parser().parse_args(["worker", "--dtype", "bfloat16"]).dtype == "bfloat16"


def test_broker_url_out_of_range_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.cli import main
    from mesh.endpoints import EndpointError, Endpoints

    for port in ("99999", "65533", "0", "x"):
        with pytest.raises(EndpointError, match="PORT must be a number from 1 to 65532"):
            Endpoints.from_url(f"tcp://127.0.0.1:{port}")
    assert Endpoints.from_url("tcp://127.0.0.1:65532").bus_out == "tcp://127.0.0.1:65535"
    assert main(["up", "--broker", "tcp://127.0.0.1:99999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mesh up: broker URL") and "65532" in err, err


def test_worker_device_is_checked_before_the_model_loads() -> None:
    import torch

    from mesh.engines.transformers_backend import check_device

    assert check_device("cpu") == torch.device("cpu")
    for bad, reason in [("bogus", "not a torch device"), ("cuda:-1", "not a torch device"), ("meta", "cpu, cuda")]:
        with pytest.raises(ValueError, match=reason):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable cuda device"):
            check_device("cuda")
    # The whole path: one line and exit 2, before any model is read (no broker needed to get there).
    result = mesh("worker", "--broker", "tcp://127.0.0.1:9", "--device", "bogus", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "mesh worker: --device 'bogus' is not a torch device (e.g. cpu, cuda, cuda:1)"
