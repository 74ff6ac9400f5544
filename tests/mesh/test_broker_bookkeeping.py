"""The broker's bookkeeping over a long life, driven in-process through its message handlers.

The broker's handlers never block, so a test can feed them messages and advance its clock without
the poll loop. These tests look at the broker's own tables: what they check (that a table stays
bounded) has no outside symptom until a broker has run for months.
"""

from __future__ import annotations

import time

from mesh.broker import DEPARTED_KEEP_S, Broker, BrokerConfig
from mesh.protocol import Announcement, Kind, encode, pack_header
from mesh.security import REFUSAL_LOG_INTERVAL


def announce(broker: Broker, worker_id: str, started_at: float) -> None:
    hello = Announcement(worker_id=worker_id, models=["m"], backend="x", capacity=1, started_at=started_at)
    broker._on_bus_in([pack_header(Kind.ANNOUNCE), encode(hello)])


def test_workers_that_said_bye_are_forgotten_after_a_while(broker_url: str) -> None:
    broker = Broker(BrokerConfig(broker_url=broker_url))
    broker.bind()
    try:
        for i in range(100):  # rolling restarts: every incarnation a new worker id
            announce(broker, f"w{i}", started_at=1.0)
            broker._on_worker([f"w{i}".encode(), pack_header(Kind.BYE)])
        assert len(broker._departed) == 100 and not broker._workers
        broker._tick(time.monotonic() + 1.0)
        assert len(broker._departed) == 100  # still remembered: announcements may be on their way
        announce(broker, "w7", started_at=1.0)  # a late one does not bring its worker back
        assert not broker._workers
        broker._tick(time.monotonic() + 2 * DEPARTED_KEEP_S + 1)
        assert not broker._departed
    finally:
        broker.close()


def test_the_times_of_logged_warnings_are_forgotten_once_they_no_longer_matter(broker_url: str) -> None:
    broker = Broker(BrokerConfig(broker_url=broker_url))
    broker.bind()
    try:
        for i in range(50):  # two processes sharing each id: the older one's announcements are refused
            announce(broker, f"twin{i}", started_at=2.0)
            announce(broker, f"twin{i}", started_at=1.0)
        assert len(broker._duplicate_logged) == 50 and broker.dropped["older_incarnation"] == 50
        broker._tick(time.monotonic() + 1.0)
        assert len(broker._duplicate_logged) == 50  # within the interval: they still silence repeats
        broker._tick(time.monotonic() + DEPARTED_KEEP_S + REFUSAL_LOG_INTERVAL + 1)
        assert not broker._duplicate_logged
    finally:
        broker.close()
