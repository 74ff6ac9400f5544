"""Incremental detokenization: text deltas from a growing list of token ids.

Decoding token by token breaks characters split over several byte tokens and
loses the leading spaces some tokenizers attach in context. So each step
decodes a short window of recent tokens twice (with and without the new
ones) and emits the difference; a window that ends in an incomplete
character (U+FFFD) waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable

#: Tokens of context kept before the new ones; enough for any merge rule in practice.
CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int] | None = None) -> None:
        """`decode(ids) -> str` (special tokens skipped); the prompt's tail gives the first tokens context."""
        self._decode = decode
        context = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (often all of it, sometimes nothing yet)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the window small so each step decodes a bounded number of tokens.
        if self._prefix_offset > CONTEXT_TOKENS:
            cut = self._prefix_offset - CONTEXT_TOKENS
            del self._ids[:cut]
            self._prefix_offset -= cut
            self._read_offset -= cut
        return delta

    def flush(self) -> str:
        """Text still pending at the end (an incomplete character is emitted as U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
