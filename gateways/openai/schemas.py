"""The OpenAI API as pydantic models: they validate requests and generate /openapi.json.

Request models accept extra fields (the SDK and tools built on it send some we
do not know); `unsupported_parameters` then names the ones we know and cannot
honour, so they are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticUseDefault

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: Most choices one request may ask for (n times the number of prompts).
MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX, description="same seed and request, same text")]
INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


def _null_means_default(value: Any) -> Any:
    if value is None:
        raise PydanticUseDefault()
    return value


def null_means_default(kind: Any) -> BeforeValidator:
    """For a field OpenAI's API lets clients send as null (the SDK sends an explicit None so): null is
    the default, and /openapi.json says null is allowed."""
    return BeforeValidator(_null_means_default, json_schema_input_type=kind | None)


Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]


class _Request(BaseModel):
    # strict: no 0 for false, no "1" for 1 (JSON numbers still fill float fields).
    model_config = ConfigDict(extra="allow", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- requests


class StreamOptions(_Request):
    include_usage: bool = False


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class MediaContentPart(_Request):
    """A part the models behind the gateway cannot read: accepted by the schema so that the refusal
    can say which part it was, rather than that the content is not a string."""

    type: Literal["image_url", "input_audio", "file"]


class ChatMessageParam(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart | MediaContentPart] | None = None
    name: str | None = None


class _SamplingParams(_Request):
    model: str = Field(min_length=1, examples=["smollm2-135m-instruct"])
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    #: The newer name of max_tokens (give one of them, or the same value twice); /v1/completions takes it too.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX, description="extension: -1 or 0 for off")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, description="extension")
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = Field(default=None, description="extension")
    ignore_eos: Annotated[bool, null_means_default(bool), Field(description="extension")] = False
    seed: Seed | None = None
    n: Annotated[Choices, null_means_default(Choices)] = 1
    stream: Annotated[bool, null_means_default(bool)] = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingParams):
    messages: list[ChatMessageParam] = Field(min_length=1, examples=[[{"role": "user", "content": "Hello!"}]])
    logprobs: Annotated[bool, null_means_default(bool)] = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(_SamplingParams):
    prompt: Prompt = Field(examples=["Once upon a time", ["one", "two"], [1, 2, 3]])
    # 0 with echo and logprobs scores a prompt without generating (how evaluation harnesses use it).
    max_tokens: int | None = Field(default=None, ge=0, le=INT32_MAX)
    echo: Annotated[
        bool,
        null_means_default(bool),
        Field(description="prefix the prompt; with logprobs, the prompt's tokens get them too"),
    ] = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


#: Parameters of the OpenAI API (and of vLLM's and llama.cpp's extensions) that this gateway
#: cannot honour, each with the test for the value that asks for nothing.
_UNSUPPORTED: dict[str, Any] = {
    "tools": _is_off,
    "tool_choice": lambda v: _is_off(v) or v == "none",
    "functions": _is_off,
    "function_call": lambda v: _is_off(v) or v == "none",
    "logit_bias": _is_off,
    "response_format": lambda v: _is_off(v) or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": _is_off,
    "modalities": lambda v: _is_off(v) or v == ["text"],
    "prediction": _is_off,
    "web_search_options": _is_off,
    "reasoning_effort": _is_off,
    "best_of": lambda v: _is_off(v) or v == 1,
    "suffix": _is_off,
    "min_p": lambda v: _is_off(v) or v == 0,
    "min_tokens": lambda v: _is_off(v) or v == 0,
    "use_beam_search": _is_off,
    "guided_json": _is_off,
    "guided_regex": _is_off,
    "guided_choice": _is_off,
    "guided_grammar": _is_off,
    "echo_chat": _is_off,
    "include_stop_str_in_output": _is_off,
    "prompt_logprobs": _is_off,
    "add_generation_prompt": lambda v: v is None or v is True,
    "continue_final_message": _is_off,
    "chat_template": _is_off,
    "chat_template_kwargs": _is_off,
    "structured_outputs": _is_off,
    "allowed_token_ids": _is_off,
    "bad_words": _is_off,
    "logits_processors": _is_off,
    "truncate_prompt_tokens": _is_off,
    "skip_special_tokens": lambda v: v is None or v is True,
    "return_tokens_as_token_ids": _is_off,
    # llama.cpp's server
    "grammar": _is_off,
    "json_schema": _is_off,
    "n_predict": lambda v: _is_off(v) or v == -1,
}


def unsupported_parameters(request: BaseModel) -> list[str]:
    """Names of parameters in the request that ask for something this gateway cannot do."""
    extra = request.model_extra
    if not extra:
        return []  # the usual request: nothing beyond the fields the schema knows
    return sorted(name for name, is_off in _UNSUPPORTED.items() if name in extra and not is_off(extra[name]))


# ----------------------------------------------------------------------------- responses


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobItem(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobItem(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprobItem]


class ChatLogprobs(_Response):
    content: list[ChatLogprobItem] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None


FinishReasonName = Literal["stop", "length", "abort"]


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(_Response):
    """One SSE event of a streamed chat completion (documentation: the stream is written by hand)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None


class Completion(_Response):
    """A completion; a streamed one is a series of these with `object` `text_completion` too."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-mesh"
    max_model_len: int | None = Field(default=None, description="extension: the context length, when known")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


class Health(_Response):
    status: Literal["ok", "unavailable"]
    workers: int
    models: list[str]
