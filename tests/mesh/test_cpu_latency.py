"""`--cpu-latency-us`: a mesh process holds the kernel's CPU latency request while it runs, and only then."""

from __future__ import annotations

import argparse
import os
import struct
from pathlib import Path

import pytest

from mesh.cli_options import microseconds
from mesh.cpu_latency import PM_QOS_DEVICE, CpuLatencyError, current_cpu_latency, idle_states, request_cpu_latency
from tests.support import ProcessGroup, wait_until

CAP_US = 7  # an unusual value, so the test can tell its own request from anyone else's

needs_pm_qos = pytest.mark.skipif(
    not os.access(PM_QOS_DEVICE, os.R_OK | os.W_OK), reason=f"no read and write access to {PM_QOS_DEVICE}"
)


@needs_pm_qos
def test_a_mesh_process_holds_the_cap_while_it_runs_and_not_after(processes: ProcessGroup, broker_url: str) -> None:
    before = current_cpu_latency()
    assert before is not None
    if before <= CAP_US:
        pytest.skip(f"something else already holds the CPU latency at {before} us")
    broker = processes.broker(broker_url, "--cpu-latency-us", str(CAP_US))
    wait_until(lambda: current_cpu_latency() == CAP_US, timeout=10, message="the broker's request in force")
    broker.stop()
    wait_until(lambda: current_cpu_latency() == before, timeout=10, message="the request gone with the broker")


@needs_pm_qos
def test_releasing_a_request_restores_the_previous_cap() -> None:
    before = current_cpu_latency()
    assert before is not None and before > CAP_US
    with request_cpu_latency(CAP_US) as request:
        assert current_cpu_latency() == CAP_US
        request.release()
        request.release()  # idempotent
        assert current_cpu_latency() == before
    assert current_cpu_latency() == before


def test_a_device_that_cannot_be_opened_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CpuLatencyError, match="needs write access to the device"):
        request_cpu_latency(0, device=tmp_path / "no-such-device")
    with pytest.raises(CpuLatencyError, match="between 0 and"):
        request_cpu_latency(-1, device=tmp_path / "no-such-device")


def test_the_request_is_a_native_s32_written_once(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    with request_cpu_latency(125, device=device):
        assert device.read_bytes() == struct.pack("=i", 125)
        assert current_cpu_latency(device) == 125


def test_microsecond_values() -> None:
    assert microseconds("0") == 0
    assert microseconds("20") == 20
    for bad in ("", "-1", "1.5", "x", str(2**31)):
        with pytest.raises(argparse.ArgumentTypeError):
            microseconds(bad)


def test_idle_states_name_the_driver_governor_and_states(tmp_path: Path) -> None:
    cpuidle, cpu0 = tmp_path / "cpuidle", tmp_path / "cpu0"
    cpuidle.mkdir()
    (cpuidle / "current_driver").write_text("intel_idle\n")
    (cpuidle / "current_governor_ro").write_text("menu\n")
    for index, (name, latency) in enumerate([("POLL", 0), ("C1", 2), ("C6", 133)]):
        state = cpu0 / f"state{index}"
        state.mkdir(parents=True)
        (state / "name").write_text(name + "\n")
        (state / "latency").write_text(f"{latency}\n")
    info = idle_states(cpuidle, cpu0, tmp_path / "no-haltpoll")
    assert info["driver"] == "intel_idle" and info["governor"] == "menu"
    assert info["states"] == [
        {"name": "POLL", "exit_latency_us": 0},
        {"name": "C1", "exit_latency_us": 2},
        {"name": "C6", "exit_latency_us": 133},
    ]
    assert info["guest_halt_poll_ns"] is None  # not a KVM guest with the haltpoll driver
    (tmp_path / "guest_halt_poll_ns").write_text("200000\n")
    assert idle_states(cpuidle, cpu0, tmp_path / "guest_halt_poll_ns")["guest_halt_poll_ns"] == 200000
