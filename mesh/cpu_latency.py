"""Asking Linux to keep idle CPUs quick to wake (the PM QoS CPU latency request).

Every hop of a request through the mesh wakes a thread: ZeroMQ hands each
message to its I/O thread and back, so a token crosses about a dozen
wake-ups between the worker and an HTTP client. When the CPU that thread
runs on is idle, the wake-up pays the CPU's exit from its sleep state: a few
microseconds for a shallow C-state on bare metal, far more for a deep one, and
on a virtual machine whose idle vCPUs halt, an interrupt delivered through the
hypervisor. On the development VM that made a ZeroMQ ping-pong between two
processes take 166 us instead of 55 us (see bench/README.md).

Linux lets a process cap the exit latency the idle governor may choose while
it holds /dev/cpu_dma_latency open with a value written to it; 0 keeps idle
CPUs polling. This is what tuned's latency-performance profile does. The
request is system-wide, costs power (an idle CPU spins instead of sleeping),
needs write access to the device (usually root), and ends when the holder
closes the file or exits, so it can never outlive the process that asked.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

PM_QOS_DEVICE = Path("/dev/cpu_dma_latency")
CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")
CPU0_IDLE_STATES = Path("/sys/devices/system/cpu/cpu0/cpuidle")
#: A KVM guest's haltpoll cpuidle driver polls up to this long before halting an idle vCPU
#: (adaptively; 0: never polls). Writable by root; see the kernel's guest-halt-polling docs.
GUEST_HALT_POLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
_VALUE = struct.Struct("=i")  # the kernel reads and writes a native s32 of microseconds
#: The largest request the kernel's s32 holds.
MAX_CPU_LATENCY_US = 2**31 - 1


class CpuLatencyError(OSError):
    """The latency request could not be made (no device, no permission, a bad value)."""


@dataclass
class CpuLatencyRequest:
    """An open request; the kernel honours it until `release()` (or the process's exit) closes the file."""

    max_us: int
    device: Path
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CpuLatencyRequest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def request_cpu_latency(max_us: int, device: Path = PM_QOS_DEVICE) -> CpuLatencyRequest:
    """Caps the wake-up latency of idle CPUs at `max_us` microseconds while the returned request is open."""
    if not 0 <= max_us <= MAX_CPU_LATENCY_US:
        raise CpuLatencyError(f"CPU latency must be between 0 and {MAX_CPU_LATENCY_US} us, got {max_us}")
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CpuLatencyError(
            f"cannot request a CPU wake-up latency of {max_us} us: {device}: {exc.strerror}; this needs write "
            "access to the device (root, or a udev rule that grants it)"
        ) from None
    try:
        os.write(fd, _VALUE.pack(max_us))
    except OSError as exc:
        os.close(fd)
        raise CpuLatencyError(f"cannot request a CPU wake-up latency of {max_us} us: {exc.strerror}") from None
    return CpuLatencyRequest(max_us, device, fd)


def hold_cpu_latency(max_us: int | None) -> contextlib.AbstractContextManager[object]:
    """A `--cpu-latency-us` value as a context: the request while it is open, nothing for None."""
    return request_cpu_latency(max_us) if max_us is not None else contextlib.nullcontext()


def current_cpu_latency(device: Path = PM_QOS_DEVICE) -> int | None:
    """The latency cap in force now (the smallest of all requests), or None when it cannot be read."""
    try:
        with open(device, "rb") as f:
            raw = f.read(_VALUE.size)
    except OSError:
        return None
    return _VALUE.unpack(raw)[0] if len(raw) == _VALUE.size else None


def idle_states(
    cpuidle: Path = CPUIDLE, cpu0: Path = CPU0_IDLE_STATES, halt_poll: Path = GUEST_HALT_POLL_NS
) -> dict[str, object]:
    """What decides how fast an idle CPU wakes here: the cpuidle driver and governor, CPU 0's states,
    and on a KVM guest with the haltpoll driver, how long it polls before halting."""

    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    states = []
    for state in sorted(cpu0.glob("state*")):
        latency = read(state / "latency")
        states.append({"name": read(state / "name"), "exit_latency_us": int(latency) if latency else None})
    return {
        "driver": read(cpuidle / "current_driver"),
        "governor": read(cpuidle / "current_governor_ro") or read(cpuidle / "current_governor"),
        "states": states,
        "pm_qos_cpu_latency_us": current_cpu_latency(),
        "guest_halt_poll_ns": int(poll) if (poll := read(halt_poll)) and poll.isdigit() else None,
    }
