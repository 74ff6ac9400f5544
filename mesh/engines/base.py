"""The Engine interface a worker drives, and the settings every backend reads."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from mesh.protocol import ErrorCode, FinishReason, GenerateRequest, TokenLogprob

#: Prompts longer than this (characters) are tokenized off the event loop. A tokenizer takes about a
#: second per megabyte on the development VM, and a worker whose loop stalls for 1.5 s misses its
#: heartbeats and is declared dead, taking every other stream it serves with it.
INLINE_TOKENIZE_CHARS = 4096

_Encoded = TypeVar("_Encoded")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine settings from `mesh worker`; each backend reads the ones it needs."""

    backend: str = "transformers"
    model_path: str | None = None
    model_names: tuple[str, ...] = ()
    capacity: int = 16
    device: str = "cpu"
    dtype: str = "auto"
    #: Seed for requests that bring none; None: such requests get a random one.
    seed: int | None = None
    #: transformers: run each request's forward pass alone (bitwise reproducible, slower).
    deterministic: bool = False
    #: transformers on CPU: torch intra-op threads.
    cpu_threads: int = 1
    #: Where converted models are cached (None: $LLM_MESH_CACHE or $XDG_CACHE_HOME/llm-mesh/models).
    cache_dir: str | None = None
    #: Context length in tokens, at most the model's (None: the model's).
    max_model_len: int | None = None
    # synthetic
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    quantization: str | None = None
    enforce_eager: bool = False
    engine_args: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class EngineOutput:
    """What one engine step gave one request: a delta; the last one has a finish reason."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0


class EngineError(Exception):
    """A request the engine refuses or cannot finish; the client receives `code` and the message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def capped_context(model_context: int, max_model_len: int | None) -> int:
    """The context a worker serves: the model's, or less (--max-model-len); 0 means unknown."""
    if max_model_len is None:
        return model_context
    return min(model_context, max_model_len) if model_context else max_model_len


def context_exceeded(prompt_tokens: int, max_tokens: int, context_length: int, resumed: int = 0) -> EngineError:
    """The refusal of a request that does not fit the context, in the words OpenAI's API uses."""
    already = f" plus {resumed} resumed tokens" if resumed else ""
    total = prompt_tokens + resumed + max_tokens
    return EngineError(
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        f"This model's maximum context length is {context_length} tokens, but the prompt ({prompt_tokens} "
        f"tokens){already} plus max_tokens ({max_tokens}) is {total} tokens. Shorten the prompt or lower max_tokens.",
    )


def fit_to_context(request: GenerateRequest, prompt_tokens: int, context_length: int) -> GenerateRequest:
    """The request with a default max_tokens (`fit_to_context`) lowered to what the prompt (and any
    resumed tokens) leave of the context, at least 1; anything else unchanged, for the engine to check."""
    if not request.fit_to_context or not context_length:
        return request
    room = context_length - prompt_tokens - len(request.resume_token_ids)
    if request.max_tokens <= room:
        return request
    return msgspec.structs.replace(request, max_tokens=max(room, 1))


def given_token_ids(request: GenerateRequest, vocab_size: int) -> list[int] | None:
    """Checks that a request gives exactly one form of prompt; returns its token ids if it gave them."""
    given = [request.prompt is not None, request.messages is not None, request.prompt_token_ids is not None]
    if sum(given) != 1:
        raise EngineError(ErrorCode.BAD_REQUEST, "give exactly one of prompt, messages or prompt_token_ids")
    if request.prompt_token_ids is None:
        return None
    if any(not 0 <= i < vocab_size for i in request.prompt_token_ids):
        raise EngineError(ErrorCode.BAD_REQUEST, f"token ids outside the vocabulary (0..{vocab_size - 1})")
    return list(request.prompt_token_ids)


async def encode_off_loop(request: GenerateRequest, encode: Callable[[GenerateRequest], _Encoded]) -> _Encoded:
    """`encode(request)` inline for a short text prompt, on a thread for a long one (tokenizers release
    the GIL while they work, so the event loop keeps running)."""
    size = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
    if size <= INLINE_TOKENIZE_CHARS:
        return encode(request)
    return await asyncio.to_thread(encode, request)


class Engine(abc.ABC):
    """A model behind a worker.

    generate() yields one EngineOutput per engine step for one request and
    ends after the output that carries a finish reason. With echo, the first
    output is the prompt's text alone, carrying its logprobs when
    prompt_logprobs asks for them (max_tokens 0 then scores without
    generating). Closing the iterator
    early (the task that consumes it is cancelled) must free the request's
    slot, as abort() does.
    """

    #: The name `mesh worker --backend` knows it by.
    backend: str = ""
    #: Whether generate() honours GenerateRequest.resume_token_ids (continues a migrated request):
    #: appends them to the prompt's token ids, skips echo, and counts them in completion_tokens.
    #: The worker refuses a migrated request for an engine that does not.
    supports_resume: bool = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @property
    @abc.abstractmethod
    def model_names(self) -> list[str]:
        """The names (aliases included) this engine serves; known after start()."""

    @property
    def context_length(self) -> int:
        """Prompt plus output tokens the model can hold; 0 if unknown."""
        return 0

    async def start(self) -> None:
        """Loads the model; the worker announces itself only after this returns."""

    async def stop(self) -> None:
        """Frees what start() took."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest, request_id: str) -> AsyncIterator[EngineOutput]:
        """Streams the request's deltas; raises EngineError for a request it refuses."""

    async def abort(self, request_id: str) -> None:
        """Stops a request early; a no-op for one that has finished."""

    def stats(self) -> EngineStats:
        return EngineStats()
