"""--profile: sample the processes a suite measures with py-spy, and say where their time goes.

Each process gets `py-spy record --format raw` for the measured phase; the raw
stacks are folded into the functions with the most samples (self and
inclusive), written to OUT/profile-<name>.txt. Without py-spy (pip install
'llm-mesh[bench]') or without ptrace rights, the profile is skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Profiler:
    out: Path
    rate: int = 1000
    _runs: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, pid: int, seconds: float) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            self.skipped[name] = "py-spy is not installed (pip install 'llm-mesh[bench]')"
            return
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"profile-{name}.raw"
        popen = subprocess.Popen(
            [
                exe,
                "record",
                "-p",
                str(pid),
                "-d",
                str(max(1, round(seconds))),
                "-r",
                str(self.rate),
                "-f",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._runs[name] = (popen, raw)

    def finish(self, timeout: float = 60.0) -> dict[str, str]:
        """Waits for every recording; returns name -> summary path (or 'skipped: reason')."""
        results = {name: f"skipped: {reason}" for name, reason in self.skipped.items()}
        for name, (popen, raw) in self._runs.items():
            try:
                _, err = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                _, err = popen.communicate()
            if not raw.exists():
                results[name] = f"skipped: py-spy failed: {err.decode(errors='replace').strip()[-300:]}"
                continue
            text = fold(raw.read_text())
            path = self.out / f"profile-{name}.txt"
            path.write_text(f"# {name}: py-spy, {self.rate} samples/s\n\n{text}")
            results[name] = str(path)
        self._runs.clear()
        return results


def fold(raw: str, top: int = 25) -> str:
    """The functions with the most samples, self and inclusive, from py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
