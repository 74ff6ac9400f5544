"""Server-sent events: the writer, and the chunk encoders of both streamed APIs.

Each token frame from the mesh becomes one `data: {json}\\n\\n` event at once.
The parts of an event that do not change within a request (id, object,
created, model) are encoded once per request; per chunk only the index, the
text (orjson) and the finish reason are added, so no model object is built
per token. The bytes follow schemas.ChatCompletionChunk and schemas.Completion.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateways.openai.errors import ApiError
from gateways.openai.schemas import Usage

DONE_EVENT = b"data: [DONE]\n\n"
_NULL = b"null"


def error_event(error: ApiError) -> bytes:
    return b"data: " + error.encode() + b"\n\n"


class _SseResponse(web.StreamResponse):
    # Headers leave with the first event, in one send: one wake-up of the client less before the first token.
    _send_headers_immediately = False


class SseWriter:
    """An open text/event-stream response."""

    __slots__ = ("response",)

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request) -> SseWriter:
        response = _SseResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        return cls(response)

    async def send(self, event: bytes) -> None:
        await self.response.write(event)

    async def close(self, last_events: bytes = DONE_EVENT) -> None:
        """Sends the last events and ends the response, in one send."""
        await self.response.write_eof(last_events)


class _ChunkEncoder:
    def __init__(self, id_: str, object_: str, created: int, model: str, include_usage: bool) -> None:
        self._head = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(id_),
                b',"object":"',
                object_.encode(),
                b'","created":',
                str(created).encode(),
                b',"model":',
                orjson.dumps(model),
                b',"choices":[',
            )
        )
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._index_cache: list[bytes] = []

    def _index(self, index: int) -> bytes:
        cache = self._index_cache
        while len(cache) <= index:
            cache.append(b'{"index":' + str(len(cache)).encode() + b",")
        return cache[index]

    def usage(self, usage: Usage) -> bytes:
        return self._head + b'],"usage":' + usage.model_dump_json().encode() + b"}\n\n"


class ChatChunkEncoder(_ChunkEncoder):
    def __init__(self, id_: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(id_, "chat.completion.chunk", created, model, include_usage)

    def role(self, index: int) -> bytes:
        return (
            self._head
            + self._index(index)
            + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
            + self._tail
        )

    def content(self, index: int, text: str, logprobs: bytes = _NULL) -> bytes:
        return b"".join(
            (
                self._head,
                self._index(index),
                b'"delta":{"content":',
                orjson.dumps(text),
                b'},"logprobs":',
                logprobs,
                b',"finish_reason":null}',
                self._tail,
            )
        )

    def finish(self, index: int, text: str, finish_reason: str, logprobs: bytes = _NULL) -> bytes:
        delta = b'{"content":' + orjson.dumps(text) + b"}" if text else b"{}"
        return b"".join(
            (
                self._head,
                self._index(index),
                b'"delta":',
                delta,
                b',"logprobs":',
                logprobs,
                b',"finish_reason":"',
                finish_reason.encode(),
                b'"}',
                self._tail,
            )
        )


class CompletionChunkEncoder(_ChunkEncoder):
    def __init__(self, id_: str, created: int, model: str, include_usage: bool) -> None:
        super().__init__(id_, "text_completion", created, model, include_usage)

    def text(self, index: int, text: str, finish_reason: str | None = None, logprobs: bytes = _NULL) -> bytes:
        finish = b'"' + finish_reason.encode() + b'"' if finish_reason else _NULL
        return b"".join(
            (
                self._head,
                self._index(index),
                b'"text":',
                orjson.dumps(text),
                b',"logprobs":',
                logprobs,
                b',"finish_reason":',
                finish,
                b"}",
                self._tail,
            )
        )
