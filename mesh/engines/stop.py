"""Stop strings over streamed text: never emitted, even when one spans several tokens.

Text that could be the start of a stop string is held back until the next
delta settles it; when a stop string appears, the text before it is released
and everything from it on is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.engines.detokenize import IncrementalDetokenizer


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


class TextStream:
    """A request's output text, token by token: detokenized, with stop strings applied.

    A migrated request passes the tokens another worker already streamed (`resumed`) and how many
    characters of their text its client received (`shown_chars`). That worker sent their ids at once
    but may have held part of their text back (a possible stop string, half a character): the rest
    of their text goes out first, through the stop strings, with the tokens that follow. Without
    `shown_chars` (a client that does not say), the client is taken to have what this stream would
    have let out of those tokens itself.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_ids: list[int],
        stops: Sequence[str],
        resumed: Sequence[int] = (),
        shown_chars: int | None = None,
    ) -> None:
        self._detok = IncrementalDetokenizer(decode, prompt_ids)
        self._stop = StopMatcher(list(stops))
        #: Text of the resumed tokens that the client has not received, not yet through the stop strings.
        self._owed = ""
        if shown_chars is None:
            for token_id in resumed:
                self.add(token_id)
        else:
            self._owed = "".join(self._detok.add(token_id) for token_id in resumed)[shown_chars:]

    def add(self, token_id: int) -> StopResult:
        """The text one more token lets out, and whether a stop string ended the output."""
        owed, self._owed = self._owed, ""
        return self._stop.feed(owed + self._detok.add(token_id))

    def finish(self) -> str:
        """What was held back, when the output ends for another reason (length, EOS)."""
        owed, self._owed = self._owed, ""
        result = self._stop.feed(owed + self._detok.flush())
        return result.text if result.stopped else result.text + self._stop.flush()


def held_back_length(text: str, stops: list[str], longest: int) -> int:
    """How many trailing characters of `text` are a proper prefix of some stop string."""
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(stop.startswith(tail) for stop in stops):
            return size
    return 0
