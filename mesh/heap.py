"""Keeping Python's garbage collector off the hot path of a long-running process.

A worker imports torch, transformers and possibly vLLM: over half a million
objects that live as long as the process. A full collection walks all of them
(about 0.35 s on the development machine, well over a second on a saturated
one), stalls the event loop, and can silence a worker's heartbeat long enough
(1.5 s) for the broker to declare it dead. Moving the objects that exist once
start-up is done into the permanent generation (`gc.freeze`, as vLLM's own
server does) keeps later collections down to what requests allocate.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collects start-up garbage, then exempts everything left from future collections; returns the count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
