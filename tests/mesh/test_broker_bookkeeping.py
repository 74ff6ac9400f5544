"""The broker's bookkeeping over a long life, driven in-process through its message handlers.

The broker's handlers never block, so a test can feed them messages and advance its clock without
the poll loop. These tests look at the broker's own tables: what they check (that a table stays
bounded) has no outside symptom until a broker has run for months.
"""

from __future__ import annotations

import time

from mesh.broker import DEPARTED_KEEP_S, Broker, BrokerConfig
from mesh.protocol import Announcement, Kind, encode, pack_header


def test_workers_that_said_bye_are_forgotten_after_a_while(broker_url: str) -> None:
    broker = Broker(BrokerConfig(broker_url=broker_url))
    broker.bind()
    try:
        for i in range(100):  # rolling restarts: every incarnation a new worker id
            hello = Announcement(worker_id=f"w{i}", models=["m"], backend="x", capacity=1, started_at=1.0)
            broker._on_bus_in([pack_header(Kind.ANNOUNCE), encode(hello)])
            broker._on_worker([f"w{i}".encode(), pack_header(Kind.BYE)])
        assert len(broker._departed) == 100 and not broker._workers
        # A late announcement of a departed worker does not bring it back...
        late = Announcement(worker_id="w7", models=["m"], backend="x", capacity=1, started_at=1.0)
        broker._on_bus_in([pack_header(Kind.ANNOUNCE), encode(late)])
        assert not broker._workers
        # ...and once no announcement of theirs can still be on its way, they are forgotten.
        broker._tick(time.monotonic() + DEPARTED_KEEP_S + 1)
        assert not broker._departed
    finally:
        broker.close()
