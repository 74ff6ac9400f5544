"""Mesh results into OpenAI response bodies: logprobs, usage arithmetic, whole responses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gateways.openai import schemas
from mesh.protocol import FinishReason, TokenLogprob, TopLogprob


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number.
    return value if math.isfinite(value) else -9999.0


def _prompt_aware(value: float | None) -> float | None:
    return None if value is None else _finite(value)  # None: a prompt's first token


def _token_bytes(item: TokenLogprob | TopLogprob) -> bytes:
    """The token's own bytes where the engine sent them; its text's otherwise."""
    return item.raw if item.raw is not None else item.token.encode()


def chat_logprobs(items: list[TokenLogprob]) -> schemas.ChatLogprobs:
    return schemas.ChatLogprobs(
        content=[
            schemas.ChatLogprobItem(
                token=item.token,
                logprob=_finite(item.logprob),
                bytes=list(_token_bytes(item)),
                top_logprobs=[
                    schemas.TopLogprobItem(token=top.token, logprob=_finite(top.logprob), bytes=list(_token_bytes(top)))
                    for top in item.top
                ],
            )
            for item in items
        ]
    )


def completion_logprobs(items: list[TokenLogprob], text_offset: int, with_top: bool) -> schemas.CompletionLogprobs:
    """With echo the items begin with the prompt's tokens, the first of which has no logprob."""
    offsets: list[int] = []
    for item in items:
        offsets.append(text_offset)
        text_offset += len(item.token)
    return schemas.CompletionLogprobs(
        tokens=[item.token for item in items],
        token_logprobs=[_prompt_aware(item.logprob) for item in items],
        top_logprobs=[
            {top.token: _finite(top.logprob) for top in item.top} if with_top and item.logprob is not None else None
            for item in items
        ],
        text_offset=offsets,
    )


@dataclass(slots=True)
class ChoiceResult:
    """One choice, accumulated from its chunks."""

    index: int
    prompt_group: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)


def total_usage(results: list[ChoiceResult]) -> schemas.Usage:
    """Prompt tokens count once per distinct prompt (n choices share one); completions add up."""
    prompt_by_group: dict[int, int] = {}
    for result in results:
        prompt_by_group[result.prompt_group] = max(prompt_by_group.get(result.prompt_group, 0), result.prompt_tokens)
    prompt = sum(prompt_by_group.values())
    completion = sum(result.completion_tokens for result in results)
    return schemas.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finish_name(reason: FinishReason | None) -> schemas.FinishReasonName | None:
    return None if reason is None else str(reason)  # type: ignore[return-value]


def chat_completion(
    id_: str, created: int, model: str, results: list[ChoiceResult], logprobs: bool
) -> schemas.ChatCompletion:
    return schemas.ChatCompletion(
        id=id_,
        created=created,
        model=model,
        choices=[
            schemas.ChatChoice(
                index=r.index,
                message=schemas.AssistantMessage(content=r.text),
                logprobs=chat_logprobs(r.logprobs) if logprobs else None,
                finish_reason=finish_name(r.finish_reason),
            )
            for r in results
        ],
        usage=total_usage(results),
    )


def completion(
    id_: str, created: int, model: str, results: list[ChoiceResult], logprobs: int | None
) -> schemas.Completion:
    return schemas.Completion(
        id=id_,
        created=created,
        model=model,
        choices=[
            schemas.CompletionChoice(
                index=r.index,
                text=r.text,
                logprobs=completion_logprobs(r.logprobs, 0, bool(logprobs)) if logprobs is not None else None,
                finish_reason=finish_name(r.finish_reason),
            )
            for r in results
        ],
        usage=total_usage(results),
    )
