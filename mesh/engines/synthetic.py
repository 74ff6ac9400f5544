"""The synthetic engine: for benchmarks and fault tests only, never a model.

It emits deterministic pseudo-words derived from the prompt and the seed,
after --ttft-ms and then every --itl-ms, so that a benchmark measures the
mesh's own overhead and a fault test is not slowed by a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

from mesh.engines.base import (
    Engine,
    EngineConfig,
    EngineOutput,
    EngineStats,
    capped_context,
    context_exceeded,
    fit_to_context,
)
from mesh.protocol import FinishReason, GenerateRequest, TokenLogprob, TopLogprob

SYNTHETIC_CONTEXT_LENGTH = 4096
_WORDS = [
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"),
    *("lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform"),
    *("victor", "whiskey", "xray", "yankee", "zulu"),
]
_TOKEN_TEXTS = [" " + word for word in _WORDS]  # each word as a token's text: built once, not per token


_MASK64 = (1 << 64) - 1


def _word(base: int, position: int) -> int:
    """The word at `position` (from 1) of the stream `base` names: splitmix64's output for that step.

    Any position is one computation (a resumed stream skips none), and nothing is built per request:
    the engine's own time stays a few microseconds, so the benchmarks charge little of it to the mesh.
    """
    z = (base + position * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % len(_WORDS)


def _prompt_text(request: GenerateRequest) -> str:
    if request.messages is not None:
        return "\n".join(f"{m.role}: {m.content}" for m in request.messages)
    if request.prompt_token_ids is not None:
        return " ".join(map(str, request.prompt_token_ids))
    return request.prompt or ""


def _alternatives(top: int) -> list[TopLogprob]:
    return [TopLogprob(rank, " " + _WORDS[rank], -1.0 - rank) for rank in range(top)]


def _token_logprob(token_id: int, top: int) -> TokenLogprob:
    return TokenLogprob(token_id, " " + _WORDS[token_id], -1.0 - token_id % 3, _alternatives(top))


def _prompt_logprobs(prompt: str, top: int | None) -> list[TokenLogprob] | None:
    """Made-up but well-formed: one entry per word of the prompt (the word is the token), the first None."""
    if top is None:
        return None
    entries = []
    for position, word in enumerate(prompt.split(" ")):
        token = word if position == 0 else " " + word
        logprob = None if position == 0 else -1.0 - (len(word) % 5) / 2
        entries.append(TokenLogprob(position, token, logprob, _alternatives(top) if position else []))
    return entries


class SyntheticEngine(Engine):
    backend = "synthetic"
    supports_resume = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._running = 0
        self._seeds = random.Random()

    @property
    def model_names(self) -> list[str]:
        return list(self.config.model_names) or ["synthetic"]

    @property
    def context_length(self) -> int:
        return capped_context(SYNTHETIC_CONTEXT_LENGTH, self.config.max_model_len)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running)

    async def generate(self, request: GenerateRequest, request_id: str) -> AsyncIterator[EngineOutput]:
        prompt = _prompt_text(request)
        prompt_tokens = len(request.prompt_token_ids or prompt.split()) or 1
        context = self.context_length
        request = fit_to_context(request, prompt_tokens, context)
        resumed = len(request.resume_token_ids)
        if prompt_tokens + resumed + request.max_tokens > context:
            raise context_exceeded(prompt_tokens, request.max_tokens, context, resumed)
        seed = request.seed if request.seed is not None else self.config.seed
        if seed is None:
            seed = self._seeds.getrandbits(63)
        digest = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
        # A migrated request continues the same deterministic stream: token k is word(base, k).
        base = int.from_bytes(digest, "little")
        self._running += 1
        try:
            if request.echo and not resumed:
                yield EngineOutput(text=prompt, logprobs=_prompt_logprobs(prompt, request.prompt_logprobs))
            if self.config.ttft_ms:
                await asyncio.sleep(self.config.ttft_ms / 1000)
            step_delay = self.config.itl_ms / 1000
            for produced in range(1, request.max_tokens + 1):
                token_id = _word(base, resumed + produced)
                output = EngineOutput(text=_TOKEN_TEXTS[token_id], token_ids=[token_id])
                if request.logprobs is not None:
                    output.logprobs = [_token_logprob(token_id, request.logprobs)]
                if produced == request.max_tokens:
                    output.finish_reason = FinishReason.LENGTH
                    output.prompt_tokens, output.completion_tokens = prompt_tokens, resumed + produced
                    yield output
                    return
                yield output
                # Yield to the loop between steps even with no delay, as a real engine would.
                await asyncio.sleep(step_delay)
            yield EngineOutput(finish_reason=FinishReason.LENGTH, prompt_tokens=prompt_tokens)
        finally:
            self._running -= 1
