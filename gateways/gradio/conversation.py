"""A chat as the UI keeps it, and the pure decisions over it: request, display, reply notes, error text."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.errors import (
    BadRequestError,
    BrokerUnavailableError,
    MeshError,
    MeshTimeoutError,
    ModelNotFoundError,
    OverloadedError,
    WorkerLostError,
)
from mesh.protocol import ChatMessage, GenerateRequest

#: Longest message the UI accepts; longer input is refused with a message, not sent.
MAX_INPUT_CHARS = 32_000
MAX_OUTPUT_TOKENS = 4096


@dataclass(slots=True)
class Turn:
    """One message of the chat. `note` (worker, TTFT, tokens/s) and errors are shown, never sent to the model."""

    role: str
    text: str
    note: str = ""
    error: bool = False


@dataclass(frozen=True, slots=True)
class Sampling:
    model: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None


@dataclass(slots=True)
class ReplyTiming:
    """What the line under a reply reports."""

    worker_id: str = ""
    ttft_s: float | None = None
    elapsed_s: float = 0.0
    tokens: int = 0


@dataclass(slots=True)
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    model: str = ""
    #: Replies started in this conversation: a reply still streaming when a later one starts
    #: (Send or Regenerate pressed meanwhile) sees the count move on and stops.
    replies: int = 0

    def last_exchange(self) -> list[Turn]:
        """The last user message and what followed it (for votes and flags)."""
        for index in range(len(self.turns) - 1, -1, -1):
            if self.turns[index].role == "user":
                return self.turns[index:]
        return []


class InputError(ValueError):
    """Input a user can fix; the message is shown in the chat as is."""


def parse_seed(raw: str | float | int | None) -> int | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"The seed must be a whole number, not {raw!r}.") from None
    if not value.is_integer() or not 0 <= value < 2**63:
        raise InputError(f"The seed must be a whole number from 0 to 2^63-1, not {raw!r}.")
    return int(value)


def check_sampling(model: str | None, temperature: float, top_p: float, max_tokens: float, seed: object) -> Sampling:
    """Validates what the controls (or an API caller) sent; raises InputError with a readable reason."""
    if not model:
        raise InputError("Choose a model first: no model is selected (is any worker running?).")
    try:
        temperature, top_p, max_tokens_f = float(temperature), float(top_p), float(max_tokens)
    except (TypeError, ValueError):
        raise InputError("Temperature, top-p and max output tokens must be numbers.") from None
    if not 0.0 <= temperature <= 2.0:
        raise InputError(f"Temperature must be between 0 and 2, not {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"Top-p must be above 0 and at most 1, not {top_p}.")
    if not max_tokens_f.is_integer() or not 1 <= max_tokens_f <= MAX_OUTPUT_TOKENS:
        raise InputError(f"Max output tokens must be a whole number from 1 to {MAX_OUTPUT_TOKENS}, not {max_tokens}.")
    return Sampling(str(model), temperature, top_p, int(max_tokens_f), parse_seed(seed))  # type: ignore[arg-type]


def check_message(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise InputError("Type a message first.")
    if len(text) > MAX_INPUT_CHARS:
        raise InputError(f"The message is {len(text)} characters long; the limit is {MAX_INPUT_CHARS}.")
    return text


def to_request(conversation: Conversation, sampling: Sampling) -> GenerateRequest:
    """The chat so far as one request: error turns and notes stay out of the model's context."""
    messages = [ChatMessage(t.role, t.text) for t in conversation.turns if not t.error and t.text]
    return GenerateRequest(
        model=sampling.model,
        messages=messages,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
    )


def reply_note(timing: ReplyTiming) -> str:
    parts = [f"worker {timing.worker_id or '?'}"]
    if timing.ttft_s is not None:
        parts.append(f"first token {timing.ttft_s * 1000:.0f} ms")
        decode_s = timing.elapsed_s - timing.ttft_s
        if timing.tokens > 1 and decode_s > 0:
            parts.append(f"{(timing.tokens - 1) / decode_s:.1f} tokens/s")
    parts.append(f"{timing.tokens} tokens")
    return " · ".join(parts)


def error_text(exc: Exception, model: str) -> str:
    """What the chat shows for a failure: the cause and what to do, never a traceback."""
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, ModelNotFoundError):
        return f"No worker serves the model {model!r} right now. Start one, or pick another model."
    if isinstance(exc, OverloadedError):
        return "Every worker for this model is busy and the queue is full. Try again in a moment."
    if isinstance(exc, WorkerLostError):
        return "The worker serving this reply went away before it finished. Press Regenerate to try again."
    if isinstance(exc, BadRequestError):
        return f"The mesh refused this request: {exc.message}"
    if isinstance(exc, BrokerUnavailableError):
        return "The mesh is not reachable: no broker answers. Is `mesh broker` running?"
    if isinstance(exc, MeshTimeoutError):
        return f"No answer from the mesh in time ({exc.message})."
    if isinstance(exc, MeshError):
        return f"The request failed: {exc.message}"
    return "Something went wrong on the UI server; the details are in its log."


def render(conversation: Conversation) -> list[dict[str, str]]:
    """The Chatbot's value (Gradio's messages format), notes under the replies."""
    shown: list[dict[str, str]] = []
    for turn in conversation.turns:
        if turn.error:
            shown.append({"role": "assistant", "content": f"⚠️ {turn.text}"})
        elif turn.role == "assistant" and turn.note:
            shown.append({"role": "assistant", "content": f"{turn.text}\n\n<sub>{turn.note}</sub>"})
        else:
            shown.append({"role": turn.role, "content": turn.text})
    return shown
