"""The discovery bus: liveness arithmetic and the table of live workers.

Workers publish an Announcement on the bus when they start, when their load
changes and every HEARTBEAT_INTERVAL; the broker publishes a BEACON at the
same pace and a WORKER_GONE when it buries one. A peer silent for
HEARTBEAT_LIVENESS intervals is dead. A subscriber that joins gets a snapshot
of every live worker, followed by a beacon, at once (the zguide's Clone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.protocol import Announcement

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_LIVENESS = 3


def expiry_after(interval: float = HEARTBEAT_INTERVAL, liveness: int = HEARTBEAT_LIVENESS) -> float:
    """Seconds of silence after which a peer is dead."""
    return interval * liveness


@dataclass(slots=True)
class MeshView:
    """Live workers as seen from the bus: plain data, updated by whoever listens."""

    expiry: float = field(default_factory=expiry_after)
    _workers: dict[str, tuple[Announcement, float]] = field(default_factory=dict)
    #: Every model name a worker has announced since this view began, live or not.
    served_once: set[str] = field(default_factory=set)

    def apply(self, announcement: Announcement, now: float) -> None:
        current = self._workers.get(announcement.worker_id)
        if (
            current is not None
            and current[0].started_at == announcement.started_at
            and current[0].seq > announcement.seq
        ):
            return  # an older announcement overtaken by a newer one
        self._workers[announcement.worker_id] = (announcement, now)
        self.served_once.update(announcement.models)

    def remove(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def clear(self) -> None:
        self._workers.clear()

    def workers(self, now: float) -> list[Announcement]:
        """The live workers, sorted by id; forgets those silent past the expiry."""
        dead = [wid for wid, (_, seen) in self._workers.items() if now - seen > self.expiry]
        for wid in dead:
            del self._workers[wid]
        return [ann for _, (ann, _) in sorted(self._workers.items())]

    def serving(self, model: str, now: float) -> list[Announcement]:
        """The live workers that serve `model` (under any of their names): one pass, for a request's path."""
        return [ann for ann, seen in self._workers.values() if model in ann.models and now - seen <= self.expiry]

    def models(self, now: float) -> dict[str, list[Announcement]]:
        """Each served model name (aliases included) with the workers that serve it."""
        served: dict[str, list[Announcement]] = {}
        for ann in self.workers(now):
            for name in ann.models:
                served.setdefault(name, []).append(ann)
        return dict(sorted(served.items()))
