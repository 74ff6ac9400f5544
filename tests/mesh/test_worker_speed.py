"""The speeds a worker announces (mesh.worker.SpeedMeter): plain data, no sockets.

Dispatch compares workers by tokens per second of request time. These tests pin down why: the
figure must not shrink with idle time or grow with the worker's share of the traffic.
"""

from __future__ import annotations

import pytest

from mesh.worker import SpeedMeter


def run(meter: SpeedMeter, start: float, seconds: float, requests: int, tokens_per_s_each: float) -> float:
    """`requests` requests running together from `start` for `seconds`, each making tokens at its rate."""
    meter.set_running(requests, start)
    steps = int(seconds * 10)
    for step in range(1, steps + 1):
        meter.add(round(requests * tokens_per_s_each / 10), start + step / 10)
    meter.set_running(0, start + seconds)
    return start + seconds


def test_a_worker_idle_most_of_the_window_is_not_slower_for_it() -> None:
    meter = SpeedMeter(now=0.0)
    end = run(meter, start=0.0, seconds=1.0, requests=1, tokens_per_s_each=50.0)
    throughput, per_request = meter.rates(end + 8.0)
    assert per_request == pytest.approx(50.0)
    assert throughput == pytest.approx(50 / 9.0)  # what it produced over its 9 s of life


def test_a_busy_worker_does_not_look_faster_for_being_busy() -> None:
    quiet, busy = SpeedMeter(now=0.0), SpeedMeter(now=0.0)
    run(quiet, start=0.0, seconds=10.0, requests=1, tokens_per_s_each=20.0)
    run(busy, start=0.0, seconds=10.0, requests=8, tokens_per_s_each=20.0)
    assert quiet.rates(10.0)[1] == pytest.approx(busy.rates(10.0)[1]) == pytest.approx(20.0)
    assert busy.rates(10.0)[0] == pytest.approx(8 * quiet.rates(10.0)[0])


def test_an_idle_worker_keeps_its_speed_but_not_its_throughput() -> None:
    meter = SpeedMeter(now=0.0)
    end = run(meter, start=0.0, seconds=2.0, requests=2, tokens_per_s_each=30.0)
    throughput, per_request = meter.rates(end + 60.0)
    assert throughput == 0.0 and per_request == pytest.approx(30.0)


def test_a_new_worker_is_unmeasured_until_it_has_worked_half_a_second() -> None:
    meter = SpeedMeter(now=0.0)
    assert meter.rates(5.0) == (0.0, 0.0)
    run(meter, start=5.0, seconds=0.2, requests=1, tokens_per_s_each=100.0)
    assert meter.rates(5.2)[1] == 0.0  # 0.2 request-seconds: too little to say
    run(meter, start=5.2, seconds=0.2, requests=2, tokens_per_s_each=100.0)
    assert meter.rates(5.4)[1] == pytest.approx(100.0)  # 0.6 request-seconds
