"""Stop strings over streamed text: never emitted, even when one spans several tokens.

Text that could be the start of a stop string is held back until the next
delta settles it; when a stop string appears, the text before it is released
and everything from it on is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StopResult:
    #: Text that is safe to emit now.
    text: str
    #: True when a stop string was found (the request is done).
    stopped: bool = False


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    def feed(self, delta: str) -> StopResult:
        """Adds decoded text; returns what may be emitted and whether a stop string ended it."""
        if not self._stops:
            return StopResult(delta)
        text = self._held + delta
        first = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self._held = ""
            return StopResult(text[:first], stopped=True)
        keep = held_back_length(text, self._stops, self._longest)
        self._held = text[len(text) - keep :] if keep else ""
        return StopResult(text[: len(text) - keep])

    def flush(self) -> str:
        """The held-back text, released when the request ends for another reason."""
        text, self._held = self._held, ""
        return text


def held_back_length(text: str, stops: list[str], longest: int) -> int:
    """How many trailing characters of `text` are a proper prefix of some stop string."""
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(stop.startswith(tail) for stop in stops):
            return size
    return 0
