"""The llm-mesh wire protocol: every message that crosses a socket, defined once.

A message is a ZeroMQ multipart message whose first frame is a fixed header:

    byte 0      protocol version (PROTOCOL_VERSION)
    byte 1      message kind (Kind)
    bytes 2..   request id (REQUEST_ID_SIZE bytes) or nothing

so that the broker routes by reading the header alone and passes token
bodies through as opaque bytes. Bodies are msgpack, encoded from the typed
structures below (msgspec). Frames per kind:

    SUBMIT        client -> broker -> worker   [header, model name (utf-8), GenerateRequest]
    CANCEL        client -> broker -> worker   [header]
    TOKENS        worker -> broker -> client   [header, TokenChunk]
    DONE          worker -> broker -> client   [header, Done]
    ERROR         worker or broker -> client   [header, ErrorReply]
    BYE           worker -> broker (back)      [header]
    ANNOUNCE      worker -> bus                [header, Announcement]   (also the heartbeat)
    WORKER_GONE   broker -> bus                [header, WorkerGone]
    BEACON        broker -> bus                [header, BrokerInfo]     (the broker's heartbeat)
"""

from __future__ import annotations

import enum
import os
from typing import Any, TypeVar

import msgspec

PROTOCOL_VERSION = 1
REQUEST_ID_SIZE = 16
HEADER_SIZE = 2
#: Default ZMQ_MAXMSGSIZE for every receiving socket: prompts are large, but not this large.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Kind(enum.IntEnum):
    SUBMIT = 1
    CANCEL = 2
    TOKENS = 3
    DONE = 4
    ERROR = 5
    BYE = 6
    ANNOUNCE = 7
    WORKER_GONE = 8
    BEACON = 9


_KIND_BYTES = frozenset(k.value for k in Kind)


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS, a stop string or a stop token id
    LENGTH = 1  # max_tokens or the context length was reached
    ABORT = 2  # cancelled

    def __str__(self) -> str:
        return self.name.lower()


class ErrorCode(enum.Enum):
    MODEL_NOT_FOUND = "model_not_found"
    OVERLOADED = "overloaded"
    WORKER_LOST = "worker_lost"
    BAD_REQUEST = "bad_request"
    #: A bad request whose prompt plus max_tokens do not fit the model's context. It has its own
    #: code because clients act on it: OpenAI's name, which LangChain and LiteLLM recognise.
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    #: A worker that cannot take a request it was sent (draining, full): the
    #: broker retries it elsewhere; clients never see this code.
    WORKER_UNAVAILABLE = "worker_unavailable"
    #: The client's CURVE key was taken off the broker's allow-list while it was connected.
    FORBIDDEN = "forbidden"

    def __str__(self) -> str:
        return self.value


class ProtocolError(ValueError):
    """A frame that does not follow this protocol (the receiver counts and drops it)."""


# --------------------------------------------------------------------------- header


def new_request_id() -> bytes:
    return os.urandom(REQUEST_ID_SIZE)


def pack_header(kind: Kind, request_id: bytes = b"") -> bytes:
    return bytes((PROTOCOL_VERSION, kind)) + request_id


def parse_header(frame: bytes) -> tuple[Kind, bytes]:
    """Returns (kind, request id); raises ProtocolError for anything else."""
    size = len(frame)
    if size != HEADER_SIZE and size != HEADER_SIZE + REQUEST_ID_SIZE:
        raise ProtocolError(f"header of {size} bytes")
    if frame[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {frame[0]}")
    kind = frame[1]
    if kind not in _KIND_BYTES:
        raise ProtocolError(f"message kind {kind}")
    return Kind(kind), frame[HEADER_SIZE:]


# --------------------------------------------------------------------------- bodies


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str
    name: str | None = None


class GenerateRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One generation: a plain prompt, chat messages, or prompt token ids."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 16
    #: max_tokens is a default the user did not choose: an engine lowers it to the room the prompt
    #: leaves in the context rather than refusing the request (OpenAI's unset max_tokens).
    fit_to_context: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None
    #: None: no logprobs; 0: the chosen token's; k: also the k most likely alternatives.
    logprobs: int | None = None
    #: The worker's first chunk carries the prompt's text (and no token ids).
    echo: bool = False
    #: With echo: that first chunk also carries one logprob entry per prompt token (the first
    #: token's logprob is None: nothing predicts it), with this many alternatives each.
    prompt_logprobs: int | None = None
    user: str | None = None
    #: Which of a request's n choices this is: a worker's default seed (for requests that bring
    #: none) is offset by it, so that the choices differ.
    choice_index: int = 0
    #: A migrated request: completion tokens another worker already produced (and the client
    #: already streamed). The engine continues after them, as if it had generated them itself;
    #: max_tokens counts only what is still to come. Engines without `supports_resume` refuse it.
    resume_token_ids: list[int] = []
    #: Characters of those tokens' text the client has received: what the lost worker still held
    #: back (a possible stop string, half a character) the new one sends first. None (a client that
    #: does not say): the client is taken to have what the new worker would have let out itself.
    resume_text_chars: int | None = None


def offset_seed(seed: int, offset: int) -> int:
    """seed + offset, wrapped into the int64 range that seeds travel in."""
    return (seed + offset + 2**63) % 2**64 - 2**63


class TopLogprob(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    token_id: int
    token: str
    logprob: float
    #: The token's bytes, where the engine knows them: a token that holds part of a character has
    #: none of its own text (`token` is U+FFFD), but its bytes put the character back together.
    raw: bytes | None = None


class TokenLogprob(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token
    top: list[TopLogprob] = []
    raw: bytes | None = None  # as TopLogprob.raw


class TokenChunk(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """Every token one request gained since its previous frame (a delta, never cumulative): one
    engine step, or several joined when they came faster than the worker's stream interval."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    #: The frame's number in its request, from 1 (0: not numbered). A client that finds a number
    #: missing knows frames were lost on the way (a connection that dropped) and moves the request on.
    seq: int = 0


class Done(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """The last frame of a request: the final delta (often empty), finish and usage."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    worker_id: str
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    seq: int = 0  # as TokenChunk.seq: one more than the request's last TOKENS frame


class ErrorReply(msgspec.Struct, array_like=True, omit_defaults=True):
    code: ErrorCode
    message: str
    worker_id: str = ""


class Announcement(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a worker tells the mesh about itself: on start, on load change, every heartbeat."""

    worker_id: str
    models: list[str]
    backend: str
    capacity: int
    inflight: int = 0
    waiting: int = 0
    #: Tokens produced per second over the last 10 s, all requests together (a load figure).
    tokens_per_s: float = 0.0
    #: The pace of one request here once it streams (tokens per second after its first token), over the
    #: last 10 s: the worker's speed, whatever its share of the traffic (dispatch compares workers by it).
    #: Kept until the window holds enough to measure again; 0 until first measured.
    request_tokens_per_s: float = 0.0
    context_length: int = 0
    version: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    seq: int = 0
    draining: bool = False


class WorkerGone(msgspec.Struct, omit_defaults=True):
    worker_id: str
    reason: str


class BrokerInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    version: str
    endpoints: dict[str, str]
    dispatch_method: str
    pid: int
    started_at: float
    workers: int = 0
    queued: int = 0
    inflight: int = 0
    #: Counters of dropped input, by reason (malformed frames and the like).
    dropped: dict[str, int] = {}
    #: True on the beacon that ends a snapshot (every live worker was just announced).
    snapshot: bool = False


# --------------------------------------------------------------------------- codec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
# Built once at import and never changed: one decoder per body type.
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {
    type_: msgspec.msgpack.Decoder(type_)
    for type_ in (GenerateRequest, TokenChunk, Done, ErrorReply, Announcement, WorkerGone, BrokerInfo)
}


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(body: bytes, type_: type[T]) -> T:
    """Decodes one body into its type; raises ProtocolError for anything malformed."""
    try:
        return _decoders[type_].decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # msgspec: bad UTF-8 raises this
        raise ProtocolError(f"bad {type_.__name__} body: {exc}") from None


def error_frames(request_id: bytes, code: ErrorCode, message: str, worker_id: str = "") -> list[bytes]:
    return [pack_header(Kind.ERROR, request_id), encode(ErrorReply(code, message, worker_id))]
