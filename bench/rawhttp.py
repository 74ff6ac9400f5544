"""A minimal streaming HTTP/1.1 client, so that latency figures charge the server, not the client.

A general HTTP client library spends a few hundred microseconds of Python per
request building it and parsing the response headers: at the sub-millisecond
scale that would be charged to the stack under test. This client sends
pre-encoded request bytes over kept-alive connections and reads the chunked
SSE body as it arrives, the way `wrk`-style load generators do. It handles
exactly what an OpenAI-compatible streaming endpoint sends, nothing more.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import msgspec

from bench.load import HttpTarget, Timing, completion_body, event_decoder


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer


class RawHttpPool:
    """Kept-alive connections to one host, one per request in flight."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def acquire(self) -> _Connection:
        return self._idle.pop() if self._idle else await self._connect()

    def release(self, connection: _Connection) -> None:
        self._idle.append(connection)

    async def close(self) -> None:
        for connection in self._idle:
            connection.writer.close()
        self._idle.clear()


def raw_http_requester(pool: RawHttpPool, target: HttpTarget, max_tokens: int) -> Callable[[Timing], Awaitable[None]]:
    path = urlsplit(f"{target.base_url}/completions").path
    body = msgspec.json.encode(completion_body(target, max_tokens))
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {pool.host}:{pool.port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {target.api_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def one(timing: Timing) -> None:
        connection = await pool.acquire()
        reusable = False
        try:
            connection.writer.write(request)
            reader = connection.reader
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    reusable = True
                    return
                data = await reader.readexactly(size + 2)
                now = time.perf_counter()
                for line in data.split(b"\n"):
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = event_decoder.decode(line[6:])
                    if any(c.text for c in event.choices):
                        timing.arrivals.append(now)
                    if event.usage is not None:
                        timing.output_tokens = event.usage.completion_tokens
        except Exception as exc:
            timing.error = f"{type(exc).__name__}: {exc}"
        finally:
            if reusable:
                pool.release(connection)
            else:
                connection.writer.close()

    return one
