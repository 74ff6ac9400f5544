"""`mesh up` as a user runs it: everything starts, answers on both ports, and stops with nothing left behind.

The worker is the synthetic engine (fake tokens, no model), so the test measures the orchestration,
not a model load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openai import AuthenticationError, OpenAI

from tests.support import REPO_ROOT, ProcessGroup, free_broker_url, free_port, mesh_env, wait_until


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process, None when it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _children(pid: int) -> list[int]:
    return [p for p in _all_pids() if (stat := _proc_stat(p)) is not None and stat[0] == pid]


def _alive_in_groups(groups: set[int]) -> list[int]:
    return [p for p in _all_pids() if (stat := _proc_stat(p)) is not None and stat[1] in groups]


def test_up_serves_both_ports_and_stops_clean(processes: ProcessGroup) -> None:
    broker, api_port, ui_port = free_broker_url(), free_port(), free_port()
    up = processes.mesh(
        "up",
        "up",
        "--broker",
        broker,
        "--api-port",
        str(api_port),
        "--ui-port",
        str(ui_port),
        "--backend",
        "synthetic",
        "--model-names",
        "syn",
        "--worker-arg=--itl-ms",
        "--worker-arg=2",
        "--api-keys",
        "token-abc123",
    )
    groups: set[int] = set()
    try:
        wait_until(
            lambda: "llm-mesh is up" in up.output() or not up.alive(),
            timeout=240,
            interval=0.2,
            message="mesh up's banner",
        )
        assert up.alive(), up.output()
        children = _children(up.pid)
        assert len(children) == 4, children  # broker, worker, OpenAI gateway, Gradio UI
        groups = {stat[1] for pid in children if (stat := _proc_stat(pid)) is not None}
        assert groups == set(children)  # each child leads a process group of its own

        assert f"http://127.0.0.1:{api_port}/v1" in up.output() and f"http://127.0.0.1:{ui_port}/" in up.output()
        api = f"http://127.0.0.1:{api_port}/v1"
        client = OpenAI(base_url=api, api_key="token-abc123", max_retries=0, timeout=30)
        reply = client.chat.completions.create(
            model="syn", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        with pytest.raises(AuthenticationError):  # --api-keys reached the gateway
            OpenAI(base_url=api, api_key="wrong", max_retries=0, timeout=30).models.list()
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=10) as page:
            assert page.status == 200 and b"gradio" in page.read().lower()

        up.signal(signal.SIGTERM)
        assert up.popen.wait(60) == 0, up.output()
        wait_until(lambda: not _alive_in_groups(groups), timeout=5, message="no child process left")
    finally:
        for group in groups:  # whatever happened above, leave nothing running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)


def _run_up(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "up", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=mesh_env(),
        cwd=REPO_ROOT,
    )


def test_up_refuses_a_taken_port() -> None:
    api_port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", api_port))
        taken.listen()
        result = _run_up(
            "--broker",
            free_broker_url(),
            "--api-port",
            str(api_port),
            "--ui-port",
            str(free_port()),
            "--backend",
            "synthetic",
        )
    assert result.returncode != 0
    assert f"port {api_port} is already in use" in result.stderr and "OpenAI API" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_reports_a_child_that_fails_to_start() -> None:
    # An option `mesh worker` rejects: the worker exits at once, and `mesh up` says which part and why.
    result = _run_up(
        "--broker",
        free_broker_url(),
        "--api-port",
        str(free_port()),
        "--ui-port",
        str(free_port()),
        "--backend",
        "synthetic",
        "--worker-arg=--capacity",
        "--worker-arg=0",
    )
    assert result.returncode != 0
    assert "the worker exited with code 2" in result.stderr
    assert "must be at least 1" in result.stderr  # the tail of the worker's own log
    assert "Traceback" not in result.stderr


def test_up_refuses_bad_ports_and_broker_urls_in_one_line() -> None:
    # Caught before anything starts: argparse for the ports, the broker URL check for the broker.
    for args, words in [
        (("--api-port", "99999", "--no-ui"), "argument --api-port: expected a port from 1 to 65535"),
        (("--ui-port", "-1"), "argument --ui-port: expected a port from 1 to 65535"),
        (("--broker", "tcp://127.0.0.1:99999"), "PORT must be a number from 1 to 65532"),
    ]:
        result = _run_up(*args)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_log_dir_also_holds_the_uis_votes_and_flags(tmp_path: Path) -> None:
    from mesh.cli import build_parser
    from mesh.up import child_specs, config_from_args

    def gradio_argv(*args: str) -> tuple[str, ...]:
        config = config_from_args(build_parser().parse_args(["up", *args]))
        return next(spec.argv for spec in child_specs(config) if spec.name == "gradio")

    argv = gradio_argv("--log-dir", str(tmp_path), "--gradio-auth-path", str(tmp_path / "users.txt"))
    assert argv[argv.index("--log-dir") + 1] == str(tmp_path / "gradio")
    assert argv[argv.index("--gradio-auth-path") + 1] == str(tmp_path / "users.txt")
    assert "--log-dir" not in gradio_argv()  # the UI's own default, ~/.local/state/llm-mesh/gradio
