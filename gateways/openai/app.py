"""The aiohttp application: routes, middlewares, and the one MeshClient every request shares.

    app = create_app(GatewayConfig(broker_url="tcp://127.0.0.1:21001"))
    web.run_app(app, handler_cancellation=True)

handler_cancellation matters: a client that goes away cancels its handler,
and with it the request on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateways.openai import responses, schemas
from gateways.openai.config import GatewayConfig
from gateways.openai.errors import ApiError, bad_request, from_http_exception, from_mesh_error, from_validation_error
from gateways.openai.fanout import generate_all
from gateways.openai.metrics import GatewayMetrics
from gateways.openai.openapi import openapi_bytes
from gateways.openai.streaming import (
    DONE_EVENT,
    ChatChunkEncoder,
    CompletionChunkEncoder,
    SseWriter,
    error_event,
)
from gateways.openai.translate import Choice, ModelLimits, chat_choices, completion_choices
from mesh.client import Chunk, MeshClient
from mesh.errors import BrokerUnavailableError, MeshError
from mesh.protocol import GenerateRequest

log = logging.getLogger("gateways.openai")

#: Seconds the gateway waits at start-up for the broker's snapshot (it serves either way).
STARTUP_BROKER_WAIT = 2.0
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_UNAUTHENTICATED_PATHS = frozenset({"/health"})
_JSON_TYPES = frozenset({"application/json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
_Body = TypeVar("_Body", bound=BaseModel)


@dataclass(slots=True)
class GatewayState:
    config: GatewayConfig
    metrics: GatewayMetrics
    openapi: bytes
    client: MeshClient | None = None

    @property
    def mesh(self) -> MeshClient:
        assert self.client is not None, "the mesh client starts with the app"
        return self.client


STATE = web.AppKey("gateway_state", GatewayState)
REQUEST_ID = "gateway_request_id"
ARRIVED = "gateway_arrived"


def create_app(config: GatewayConfig) -> web.Application:
    state = GatewayState(config, GatewayMetrics(), openapi_bytes())
    # A middleware a configuration does not need is left out: each one is a coroutine layer per request.
    middlewares: list[Middleware] = [_outer_middleware]
    if config.allowed_origins:
        middlewares.append(_cors_middleware)
    if config.api_keys:
        middlewares.append(_auth_middleware)
    app = web.Application(client_max_size=config.max_body_size, middlewares=middlewares)
    app[STATE] = state
    app.cleanup_ctx.append(_mesh_client)
    app.on_response_prepare.append(_add_headers)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model:.+}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    return app


async def _mesh_client(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    state.client = client = MeshClient(config.broker_url, security=config.security, timeout=config.timeout)
    await client.start()
    try:
        await client.wait_for_broker(STARTUP_BROKER_WAIT)
    except BrokerUnavailableError:
        log.warning("no broker at %s yet; requests get 503 until it answers", config.broker_url)
    yield
    await client.close()
    state.client = None


# ----------------------------------------------------------------------------- middlewares


def _random_id() -> str:
    """32 random hex digits, as uuid4().hex but a fifth of its cost (no UUID object on the hot path)."""
    return os.urandom(16).hex()


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _outer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, errors into OpenAI's shape, and the request counters."""
    offered = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = offered if _REQUEST_ID_RE.match(offered) else _random_id()
    request[ARRIVED] = time.perf_counter()
    metrics = request.app[STATE].metrics
    error: ApiError | None = None
    try:
        response = await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = from_http_exception(exc)
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: nobody to answer
    except Exception:
        log.exception("request %s failed", request[REQUEST_ID])
        error = ApiError(500, "internal error in the gateway", "server_error")
    if error is not None:
        response = error.response()
        metrics.errors.labels(_route_name(request), str(error.status), error.type).inc()
    metrics.requests.labels(_route_name(request), request.method, str(response.status)).inc()
    return response


def _origin_allowed(config: GatewayConfig, origin: str) -> bool:
    return "*" in config.allowed_origins or origin in config.allowed_origins


@web.middleware
async def _cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers preflights itself (before authentication: browsers send no key with them)."""
    config = request.app[STATE].config
    origin = request.headers.get("Origin")
    if (
        request.method == "OPTIONS"
        and origin
        and config.allowed_origins
        and "Access-Control-Request-Method" in request.headers
    ):
        if not _origin_allowed(config, origin):
            raise ApiError(403, f"origin {origin} is not allowed", code="cors_origin_denied")
        headers = {
            "Access-Control-Allow-Methods": ", ".join(config.allowed_methods),
            "Access-Control-Allow-Headers": ", ".join(config.allowed_headers)
            if "*" not in config.allowed_headers
            else request.headers.get("Access-Control-Request-Headers", "*"),
            "Access-Control-Max-Age": "600",
        }
        return web.Response(status=204, headers=headers)
    return await handler(request)


def _cors_headers(config: GatewayConfig, request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    if not origin or not config.allowed_origins or not _origin_allowed(config, origin):
        return
    wildcard = "*" in config.allowed_origins and not config.allow_credentials
    response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
    if not wildcard:
        response.headers.add("Vary", "Origin")
    if config.allow_credentials:
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Request-Id"] = request.get(REQUEST_ID) or _random_id()
    _cors_headers(request.app[STATE].config, request, response)


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[STATE].config.api_keys
    if keys and request.path not in _UNAUTHENTICATED_PATHS:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        # aiohttp keeps header bytes that are not UTF-8 as surrogates: compare them as the bytes they were.
        token = token.strip().encode("utf-8", "surrogateescape")
        # compare_digest against every key: the time taken does not tell which one was close.
        matched = [hmac.compare_digest(token, key.encode()) for key in keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
    return await handler(request)


# ----------------------------------------------------------------------------- plain routes


def _json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(status=status, body=model.model_dump_json(), content_type="application/json")


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    client = state.mesh
    alive = client.broker_alive
    health = schemas.Health(
        status="ok" if alive else "unavailable", workers=len(client.workers()), models=list(client.models())
    )
    return _json_response(health, 200 if alive else 503)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[STATE].metrics
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].openapi, content_type="application/json")


def _model_cards(client: MeshClient) -> list[schemas.ModelCard]:
    return [
        schemas.ModelCard(
            id=name,
            created=int(min(w.started_at for w in workers)),
            max_model_len=max(w.context_length for w in workers) or None,
        )
        for name, workers in client.models().items()
    ]


async def _list_models(request: web.Request) -> web.Response:
    return _json_response(schemas.ModelList(data=_model_cards(request.app[STATE].mesh)))


async def _get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    for card in _model_cards(request.app[STATE].mesh):
        if card.id == name:
            return _json_response(card)
    raise _model_not_found(name)


def _model_not_found(name: str) -> ApiError:
    return ApiError(
        404, f"the model {name!r} does not exist or no live worker serves it", param="model", code="model_not_found"
    )


def _model_unavailable(name: str) -> ApiError:
    """A 503, which the SDK retries, where a 404 would end the client's attempts."""
    return ApiError(
        503,
        f"no live worker serves the model {name!r} at the moment",
        "service_unavailable",
        param="model",
        code="model_unavailable",
    )


# ----------------------------------------------------------------------------- completions


async def _read_body(request: web.Request, model: type[_Body]) -> _Body:
    if request.content_type not in _JSON_TYPES:
        raise bad_request(f"Content-Type must be application/json, not {request.content_type}")
    try:
        body = await request.read()  # 413 past client_max_size
    except web.RequestPayloadError as exc:  # a Content-Encoding that does not decode
        raise bad_request(f"the request body could not be read: {exc}") from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _model_limits(client: MeshClient, model: str) -> ModelLimits:
    """From the bus view: no round trip. A model no live worker serves is a 404 at once, or a 503 when
    one served it earlier."""
    if not client.broker_alive:
        raise from_mesh_error(BrokerUnavailableError(f"no broker answers at {client.endpoints.front}"))
    workers = client.serving(model)
    if not workers:
        # A model served before has workers that are gone, perhaps restarting: a retry may succeed.
        raise _model_unavailable(model) if model in client.view.served_once else _model_not_found(model)
    return ModelLimits(max(w.context_length for w in workers))


def _include_usage(body: schemas.ChatCompletionRequest | schemas.CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_body(request, schemas.ChatCompletionRequest)
    choices = chat_choices(body, _model_limits(state.mesh, body.model), state.config.default_max_tokens)
    generation = _Generation(request, state, body.model, choices)
    created = int(time.time())
    id_ = f"chatcmpl-{_random_id()}"
    if body.stream:
        encoder = ChatChunkEncoder(id_, created, body.model, _include_usage(body))
        return await generation.stream(_ChatEvents(encoder, body.logprobs), _include_usage(body), encoder.usage)
    results = await generation.collect()
    return _json_response(responses.chat_completion(id_, created, body.model, results, body.logprobs))


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_body(request, schemas.CompletionRequest)
    choices = completion_choices(body, _model_limits(state.mesh, body.model))
    generation = _Generation(request, state, body.model, choices)
    created = int(time.time())
    id_ = f"cmpl-{_random_id()}"
    if body.stream:
        encoder = CompletionChunkEncoder(id_, created, body.model, _include_usage(body))
        return await generation.stream(
            _CompletionEvents(encoder, body.logprobs, len(choices)), _include_usage(body), encoder.usage
        )
    results = await generation.collect()
    return _json_response(responses.completion(id_, created, body.model, results, body.logprobs))


class _ChatEvents:
    """SSE events of a chat stream: a role chunk first, then content, then the finish."""

    def __init__(self, encoder: ChatChunkEncoder, logprobs: bool) -> None:
        self.encoder = encoder
        self.logprobs = logprobs

    def first(self, index: int) -> bytes | None:
        return self.encoder.role(index)

    def chunk(self, index: int, chunk: Chunk) -> bytes | None:
        logprobs = orjson.dumps(responses.chat_logprobs(chunk.logprobs or []).model_dump()) if self.logprobs else None
        if chunk.finish_reason is not None:
            if logprobs is None:
                return self.encoder.finish(index, chunk.text, str(chunk.finish_reason))
            return self.encoder.finish(index, chunk.text, str(chunk.finish_reason), logprobs)
        if not chunk.text and not chunk.logprobs:
            return None
        return (
            self.encoder.content(index, chunk.text)
            if logprobs is None
            else self.encoder.content(index, chunk.text, logprobs)
        )


class _CompletionEvents:
    def __init__(self, encoder: CompletionChunkEncoder, logprobs: int | None, choices: int) -> None:
        self.encoder = encoder
        self.logprobs = logprobs
        self.offsets = [0] * choices

    def first(self, index: int) -> bytes | None:
        return None

    def chunk(self, index: int, chunk: Chunk) -> bytes | None:
        finish = str(chunk.finish_reason) if chunk.finish_reason is not None else None
        if self.logprobs is None:
            return self.encoder.text(index, chunk.text, finish) if finish is not None or chunk.text else None
        # A chunk with no text can still carry tokens (text held back by a possible stop string or a
        # split character): their entries go out now, as the non-streamed response lists them.
        items = chunk.logprobs or []
        if finish is None and not chunk.text and not items:
            return None
        logprobs = responses.completion_logprobs(items, self.offsets[index], bool(self.logprobs))
        # Offsets follow the tokens, as in the non-streamed response, whatever text this chunk releases.
        self.offsets[index] += sum(len(item.token) for item in items)
        return self.encoder.text(index, chunk.text, finish, orjson.dumps(logprobs.model_dump()))


class _Generation:
    """One completion request's choices on the mesh, with their metrics."""

    def __init__(self, request: web.Request, state: GatewayState, model: str, choices: list[Choice]) -> None:
        self.request = request
        self.state = state
        self.model = model
        self.choices = choices
        self.results = [responses.ChoiceResult(c.index, c.prompt_group) for c in choices]
        metrics = state.metrics
        self._ttft = metrics.ttft.labels(model)
        self._itl = metrics.itl.labels(model)
        self._last = [0.0] * len(choices)

    def _account(self, position: int, chunk: Chunk) -> bool:
        """Adds a chunk to its choice; returns True for the choice's first chunk."""
        now = time.perf_counter()
        result = self.results[position]
        first = self._last[position] == 0.0
        # A delta may hold several tokens (a reader that fell behind takes them merged): every token
        # but a choice's first counts once in the ITL histogram, so its count is tokens - 1.
        tokens = max(len(chunk.token_ids), 1)
        if first:
            self._ttft.observe(now - self.request[ARRIVED])
            for _ in range(tokens - 1):
                self._itl.observe(0.0)  # arrived with the first token
        else:
            gap = (now - self._last[position]) / tokens
            for _ in range(tokens):
                self._itl.observe(gap)
        self._last[position] = now
        result.texts.append(chunk.text)
        if chunk.logprobs:
            result.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            assert chunk.usage is not None
            result.finish_reason = chunk.finish_reason
            result.prompt_tokens = chunk.usage.prompt_tokens
            result.completion_tokens = chunk.usage.completion_tokens
        return first

    def _count_tokens(self) -> None:
        metrics = self.state.metrics
        usage = responses.total_usage(self.results)
        metrics.generated_tokens.labels(self.model).inc(usage.completion_tokens)
        metrics.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)

    def _requests(self) -> list[GenerateRequest]:
        return [choice.request for choice in self.choices]

    async def collect(self) -> list[responses.ChoiceResult]:
        in_flight = self.state.metrics.in_flight
        in_flight.inc()
        try:
            async with contextlib.aclosing(generate_all(self.state.mesh, self._requests())) as stream:
                async for position, chunk in stream:
                    self._account(position, chunk)
        except MeshError as exc:
            raise from_mesh_error(exc) from None
        finally:
            in_flight.dec()
            self._count_tokens()
        return self.results

    async def _fail_stream(self, writer: SseWriter, error: ApiError) -> web.StreamResponse:
        """Too late for a status: the error is an event, and the stream still ends properly."""
        self.state.metrics.errors.labels(_route_name(self.request), str(error.status), error.type).inc()
        await writer.close(error_event(error) + DONE_EVENT)
        return writer.response

    async def stream(
        self,
        events: _ChatEvents | _CompletionEvents,
        include_usage: bool,
        usage_event: Callable[[schemas.Usage], bytes],
    ) -> web.StreamResponse:
        """Headers go out with the first token, so that a failure before it gets its own HTTP status."""
        metrics = self.state.metrics
        writer: SseWriter | None = None
        metrics.in_flight.inc()
        try:
            async with contextlib.aclosing(generate_all(self.state.mesh, self._requests())) as stream:
                try:
                    async for position, chunk in stream:
                        if writer is None:
                            writer = await SseWriter.open(self.request)
                        index = self.choices[position].index
                        event = events.chunk(index, chunk)
                        if self._account(position, chunk) and (head := events.first(index)) is not None:
                            event = head + event if event is not None else head  # one send, not two
                        if event is not None:
                            await writer.send(event)
                except MeshError as exc:
                    if writer is None:
                        raise from_mesh_error(exc) from None
                    return await self._fail_stream(writer, from_mesh_error(exc))
                except ConnectionError:
                    raise
                except Exception:
                    if writer is None:
                        raise
                    log.exception("request %s failed mid-stream", self.request[REQUEST_ID])
                    internal = ApiError(500, "internal error in the gateway", "server_error")
                    return await self._fail_stream(writer, internal)
            assert writer is not None
            usage = usage_event(responses.total_usage(self.results)) if include_usage else b""
            await writer.close(usage + DONE_EVENT)
            return writer.response
        except ConnectionError:
            if writer is None:
                raise
            # The client went away mid-stream; leaving the aclosing block has cancelled the request.
            log.debug("request %s: the client disconnected mid-stream", self.request[REQUEST_ID])
            return writer.response
        finally:
            metrics.in_flight.dec()
            self._count_tokens()
