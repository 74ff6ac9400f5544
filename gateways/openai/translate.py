"""OpenAI requests into mesh GenerateRequests: pure functions, one decision each.

A request becomes one GenerateRequest per choice. Completions with a list of
prompts get n choices per prompt, numbered prompt-major (OpenAI's order).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateways.openai.errors import ApiError, bad_request
from gateways.openai.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessageParam,
    CompletionRequest,
    TextContentPart,
    unsupported_parameters,
)
from mesh.protocol import ChatMessage, ErrorCode, GenerateRequest, offset_seed

#: OpenAI's default for /v1/completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What the bus says about a model: its largest announced context (0: unknown)."""

    context_length: int = 0


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    #: Choices that share a prompt count its tokens once in usage.
    prompt_group: int
    request: GenerateRequest


def check_common(request: ChatCompletionRequest | CompletionRequest) -> None:
    unsupported = unsupported_parameters(request)
    if unsupported:
        names = ", ".join(unsupported)
        raise bad_request(f"unsupported parameter{'s' if len(unsupported) > 1 else ''}: {names}", unsupported[0])
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of n uses seed + i, wrapped into int64 so that every choice stays valid."""
    return None if seed is None else offset_seed(seed, index)


@dataclass(frozen=True, slots=True)
class TokenBudget:
    max_tokens: int
    #: A default, not the user's: the engine lowers it to what the prompt leaves of the context.
    fit_to_context: bool = False


def resolve_max_tokens(
    max_tokens: int | None,
    max_completion_tokens: int | None,
    default: int,
    limits: ModelLimits,
    known_prompt_tokens: int = 0,
) -> TokenBudget:
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send only one", "max_tokens")
    explicit = max_completion_tokens if max_completion_tokens is not None else max_tokens
    context = limits.context_length
    if explicit is None:
        # Only the worker knows a text prompt's length: it fits the default to the room left.
        return TokenBudget(min(default, context) if context else default, fit_to_context=True)
    param = "max_completion_tokens" if max_completion_tokens is not None else "max_tokens"
    if context and known_prompt_tokens + explicit > context:
        what = f"the prompt ({known_prompt_tokens} tokens) plus {param}" if known_prompt_tokens else param
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens, but {what} ({explicit}) exceeds it.",
            param=param,
            code=ErrorCode.CONTEXT_LENGTH_EXCEEDED.value,
        )
    return TokenBudget(explicit)


def _sampling(request: ChatCompletionRequest | CompletionRequest) -> dict[str, object]:
    fields: dict[str, object] = {
        "model": request.model,
        "stop": stop_list(request.stop),
        "ignore_eos": request.ignore_eos,
        "user": request.user,
    }
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    if request.top_k is not None and request.top_k > 0:
        fields["top_k"] = request.top_k
    if request.stop_token_ids:
        fields["stop_token_ids"] = list(request.stop_token_ids)
    return fields


def _message_text(message: ChatMessageParam, position: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if not isinstance(part, TextContentPart):
            raise bad_request(
                f"content parts of type {part.type} are not supported: the models here read text only",
                f"messages.{position}.content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def chat_choices(request: ChatCompletionRequest, limits: ModelLimits, default_max_tokens: int) -> list[Choice]:
    check_common(request)
    if request.top_logprobs and not request.logprobs:  # 0 asks for nothing: tolerated, as vLLM does
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    budget = resolve_max_tokens(request.max_tokens, request.max_completion_tokens, default_max_tokens, limits)
    messages = [
        ChatMessage("system" if m.role == "developer" else m.role, _message_text(m, i), m.name)
        for i, m in enumerate(request.messages)
    ]
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    sampling = _sampling(request)
    return [
        Choice(
            i,
            0,
            GenerateRequest(
                messages=messages,
                max_tokens=budget.max_tokens,
                fit_to_context=budget.fit_to_context,
                seed=choice_seed(request.seed, i),
                choice_index=i,
                logprobs=logprobs,
                **sampling,  # type: ignore[arg-type]
            ),
        )
        for i in range(request.n)
    ]


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One entry per prompt (the schema has already refused empty lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def completion_choices(request: CompletionRequest, limits: ModelLimits) -> list[Choice]:
    check_common(request)
    prompts = _prompts(request.prompt)
    if len(prompts) * request.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts times n)", "n")
    sampling = _sampling(request)
    choices: list[Choice] = []
    for group, prompt in enumerate(prompts):
        known = len(prompt) if isinstance(prompt, list) else 0
        budget = resolve_max_tokens(
            request.max_tokens, request.max_completion_tokens, COMPLETION_DEFAULT_MAX_TOKENS, limits, known
        )
        text, ids = (None, prompt) if isinstance(prompt, list) else (prompt, None)
        for j in range(request.n):
            index = group * request.n + j
            generate = GenerateRequest(
                prompt=text,
                prompt_token_ids=ids,
                max_tokens=budget.max_tokens,
                fit_to_context=budget.fit_to_context,
                seed=choice_seed(request.seed, j),
                choice_index=j,
                logprobs=request.logprobs,
                echo=request.echo,
                prompt_logprobs=request.logprobs if request.echo else None,
                **sampling,  # type: ignore[arg-type]
            )
            choices.append(Choice(index, group, generate))
    return choices
