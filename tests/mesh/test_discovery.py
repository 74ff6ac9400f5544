"""The bus-side worker table: expiry and ordering, as plain data."""

from __future__ import annotations

from mesh.discovery import MeshView, expiry_after
from mesh.protocol import Announcement


def ann(worker_id: str, models: list[str], seq: int = 1, started_at: float = 1.0) -> Announcement:
    return Announcement(
        worker_id=worker_id, models=models, backend="synthetic", capacity=2, seq=seq, started_at=started_at
    )


def test_workers_expire_after_missed_heartbeats() -> None:
    view = MeshView(expiry=expiry_after(0.5, 3))
    view.apply(ann("a", ["m"]), now=10.0)
    view.apply(ann("b", ["m", "alias"]), now=11.0)
    assert [w.worker_id for w in view.workers(now=11.4)] == ["a", "b"]
    assert [w.worker_id for w in view.workers(now=11.6)] == ["b"]
    assert set(view.models(now=11.6)) == {"m", "alias"}


def test_one_models_workers_by_any_of_their_names_with_the_same_expiry() -> None:
    view = MeshView(expiry=expiry_after(0.5, 3))
    view.apply(ann("a", ["m"]), now=10.0)
    view.apply(ann("b", ["m", "alias"]), now=11.0)
    assert [w.worker_id for w in view.serving("m", now=11.4)] == ["a", "b"]
    assert [w.worker_id for w in view.serving("m", now=11.6)] == ["b"]
    assert [w.worker_id for w in view.serving("alias", now=11.6)] == ["b"]
    assert view.serving("other", now=11.6) == []


def test_older_announcements_do_not_overwrite_newer_ones() -> None:
    view = MeshView()
    view.apply(ann("a", ["new"], seq=5), now=1.0)
    view.apply(ann("a", ["old"], seq=4), now=1.1)
    assert view.workers(now=1.2)[0].models == ["new"]
    # A restarted worker (new start time) starts its sequence again.
    view.apply(ann("a", ["restarted"], seq=1, started_at=2.0), now=1.3)
    assert view.workers(now=1.4)[0].models == ["restarted"]


def test_remove() -> None:
    view = MeshView()
    view.apply(ann("a", ["m"]), now=1.0)
    view.remove("a")
    assert view.workers(now=1.0) == []
