"""The speeds a worker announces (mesh.worker.SpeedMeter): plain data, no sockets.

Dispatch compares workers by the pace of one request once it streams. These tests pin down why: the
figure must not shrink with idle time, queueing or prefill, nor grow with the worker's share of the
traffic, and a burst of one-token requests must not make a worker look infinitely fast.
"""

from __future__ import annotations

import pytest

from mesh.worker import SpeedMeter


def stream(meter: SpeedMeter, start: float, seconds: float, requests: int, pace: float) -> float:
    """`requests` requests whose first tokens come at `start`, then `pace` tokens/s each for `seconds`."""
    for _ in range(requests):
        meter.add(1, start, first=True)
    for step in range(1, int(seconds * 10) + 1):
        for _ in range(requests):
            meter.add(round(pace / 10), start + step / 10)
    for _ in range(requests):
        meter.ended(start + seconds)
    return start + seconds


def test_a_worker_idle_most_of_the_window_is_not_slower_for_it() -> None:
    meter = SpeedMeter(now=0.0)
    end = stream(meter, start=0.5, seconds=1.0, requests=1, pace=50.0)  # its first token after 0.5 s of prefill
    throughput, per_request = meter.rates(end + 7.5)
    assert per_request == pytest.approx(50.0)
    assert throughput == pytest.approx(51 / 9.0)  # what it produced over its 9 s of life


def test_a_busy_worker_does_not_look_faster_for_being_busy() -> None:
    quiet, busy = SpeedMeter(now=0.0), SpeedMeter(now=0.0)
    stream(quiet, start=0.0, seconds=10.0, requests=1, pace=20.0)
    stream(busy, start=0.0, seconds=10.0, requests=8, pace=20.0)
    assert quiet.rates(10.0)[1] == pytest.approx(busy.rates(10.0)[1]) == pytest.approx(20.0)
    assert busy.rates(10.0)[0] == pytest.approx(8 * quiet.rates(10.0)[0])


def test_an_idle_worker_keeps_its_speed_but_not_its_throughput() -> None:
    meter = SpeedMeter(now=0.0)
    end = stream(meter, start=0.0, seconds=2.0, requests=2, pace=30.0)
    assert meter.rates(end + 60.0) == (0.0, pytest.approx(30.0))


def test_a_burst_after_idle_keeps_the_speed_until_it_has_streamed() -> None:
    """Requests waiting for their first token (queued, or in a long prefill) say nothing about pace."""
    meter = SpeedMeter(now=0.0)
    end = stream(meter, start=0.0, seconds=2.0, requests=1, pace=30.0)
    # Eight requests arrive at end + 60; their first tokens take 1.2 s: half a second in, nothing has streamed.
    assert meter.rates(end + 60.5)[1] == pytest.approx(30.0)
    stream(meter, start=end + 61.2, seconds=1.0, requests=8, pace=10.0)
    assert meter.rates(end + 62.2)[1] == pytest.approx(10.0)


def test_one_token_requests_do_not_make_a_worker_look_fast() -> None:
    meter = SpeedMeter(now=0.0)
    for i in range(1000):  # lm-eval style scoring: one token each, no pace to measure
        meter.add(1, i * 0.001, first=True)
        meter.ended(i * 0.001)
    assert meter.rates(1.0) == (pytest.approx(1000 / 1.0), 0.0)
