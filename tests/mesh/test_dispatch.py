"""Dispatch policies are pure functions: tested on plain data, no sockets."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from mesh.dispatch import POLICIES, Candidate, DispatchState, lottery, round_robin, shortest_queue


def state(seed: int = 0) -> DispatchState:
    return DispatchState(rng=random.Random(seed))


def test_shortest_queue_picks_lowest_load_relative_to_capacity() -> None:
    candidates = [Candidate(b"a", 3, 4, 10.0), Candidate(b"b", 4, 8, 10.0), Candidate(b"c", 1, 1, 99.0)]
    assert shortest_queue(candidates, state()) == 1  # 0.5 beats 0.75 and 1.0


def test_shortest_queue_breaks_ties_by_speed() -> None:
    candidates = [Candidate(b"slow", 1, 2, 5.0), Candidate(b"fast", 2, 4, 50.0)]
    assert shortest_queue(candidates, state()) == 1


def test_shortest_queue_neither_prefers_nor_shuns_a_worker_not_yet_measured() -> None:
    """A worker that fails every request at once is never measured: it must not draw every tie. A new
    one takes work as soon as the others have more."""
    never, fast = Candidate(b"never-measured", 0, 4, 0.0), Candidate(b"fast", 0, 4, 50.0)
    assert shortest_queue([never, fast], state()) == 1
    assert shortest_queue([Candidate(b"fast", 1, 4, 50.0), never], state()) == 1
    assert shortest_queue([never, Candidate(b"also-new", 0, 4, 0.0)], state()) == 0


def test_shortest_queue_fills_in_proportion_to_capacity() -> None:
    inflight = {b"a": 0, b"b": 0, b"c": 0}
    capacity = {b"a": 1, b"b": 2, b"c": 3}
    for _ in range(6):
        candidates = [Candidate(w, inflight[w], capacity[w], 1.0) for w in inflight if inflight[w] < capacity[w]]
        inflight[candidates[shortest_queue(candidates, state())].worker_id] += 1
    assert inflight == capacity


def test_lottery_is_weighted_by_speed() -> None:
    candidates = [Candidate(b"a", 0, 1, 10.0), Candidate(b"b", 0, 1, 30.0)]
    st = state(42)
    picks = Counter(lottery(candidates, st) for _ in range(4000))
    assert 0.70 < picks[1] / 4000 < 0.80


def test_lottery_treats_unmeasured_workers_as_average() -> None:
    candidates = [Candidate(b"a", 0, 1, 0.0), Candidate(b"b", 0, 1, 20.0)]
    st = state(7)
    picks = Counter(lottery(candidates, st) for _ in range(4000))
    assert 0.4 < picks[0] / 4000 < 0.6


def test_lottery_survives_speeds_no_worker_should_announce() -> None:
    for speeds in ([math.inf, 10.0], [1e308, 1e308], [math.nan, 5.0], [-1.0, 0.0]):
        candidates = [Candidate(bytes([i]), 0, 1, speed) for i, speed in enumerate(speeds)]
        assert lottery(candidates, state(3)) in (0, 1)


def test_round_robin_cycles() -> None:
    candidates = [Candidate(b"a", 0, 1, 0.0), Candidate(b"b", 0, 1, 0.0), Candidate(b"c", 0, 1, 0.0)]
    st = state()
    assert [round_robin(candidates, st) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_a_valid_index(name: str) -> None:
    policy = POLICIES[name]
    st = state(1)
    for size in range(1, 6):
        candidates = [Candidate(bytes([i]), i % 3, 3, float(i)) for i in range(size)]
        assert 0 <= policy(candidates, st) < size
