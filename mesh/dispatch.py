"""Dispatch policies: pure functions that pick a worker for one request.

Each policy takes the candidate workers (those that serve the model and have
a free slot) as plain data and returns the index of its choice. State a
policy needs between calls (a round-robin turn, a random generator) is
passed in by its owner, the broker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

DispatchMethod = Literal["shortest_queue", "lottery", "round_robin"]
DISPATCH_METHODS: tuple[DispatchMethod, ...] = ("shortest_queue", "lottery", "round_robin")


@dataclass(frozen=True, slots=True)
class Candidate:
    worker_id: bytes
    inflight: int
    capacity: int
    #: The pace of one request on this worker once it streams (Announcement.request_tokens_per_s); 0: not measured.
    speed: float


@dataclass(slots=True)
class DispatchState:
    """What the policies remember between calls; one per broker."""

    rng: random.Random
    turn: int = 0


Policy = Callable[[Sequence[Candidate], DispatchState], int]


#: The largest speed a lottery weight takes: announced figures are a worker's word, and weights
#: that are infinite, or whose sum is, would leave random.choices nothing to draw from.
MAX_WEIGHT_TOKENS_PER_S = 1e9


def _speeds(candidates: Sequence[Candidate]) -> list[float]:
    """Each candidate's speed, a worker not yet measured (or announcing nonsense) counted as the mean of
    the measured ones: neither shunned (it could never be measured) nor preferred (a worker that fails
    every request at once is never measured, and must not draw every request to it)."""
    speeds = [
        min(c.speed, MAX_WEIGHT_TOKENS_PER_S) if math.isfinite(c.speed) and c.speed > 0 else 0.0 for c in candidates
    ]
    measured = [s for s in speeds if s > 0]
    fallback = sum(measured) / len(measured) if measured else 1.0
    return [s if s > 0 else fallback for s in speeds]


def shortest_queue(candidates: Sequence[Candidate], state: DispatchState) -> int:
    """The lowest in-flight over capacity; ties go to the fastest (see _speeds), then to a measured
    worker over one not yet measured, then to the first."""
    speeds = _speeds(candidates)

    def key(i: int) -> tuple[float, float, bool]:
        c = candidates[i]
        return c.inflight / max(c.capacity, 1), -speeds[i], not c.speed > 0

    return min(range(len(candidates)), key=key)


def lottery(candidates: Sequence[Candidate], state: DispatchState) -> int:
    """Random, weighted by speed (see _speeds)."""
    return state.rng.choices(range(len(candidates)), weights=_speeds(candidates))[0]


def round_robin(candidates: Sequence[Candidate], state: DispatchState) -> int:
    choice = state.turn % len(candidates)
    state.turn += 1
    return choice


POLICIES: dict[str, Policy] = {
    "shortest_queue": shortest_queue,
    "lottery": lottery,
    "round_robin": round_robin,
}
