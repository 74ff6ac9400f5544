"""Errors in OpenAI's JSON shape, and which HTTP status each failure gets.

mesh error                  HTTP  OpenAI type
BadRequestError             400   invalid_request_error  (includes a prompt over the context)
ContextLengthError          400   invalid_request_error  code context_length_exceeded
ModelNotFoundError          404   invalid_request_error  code model_not_found
(a model served before, no live worker now)  503  service_unavailable  code model_unavailable
OverloadedError             429   rate_limit_error       (every worker full, the broker's queue too)
WorkerLostError             503   service_unavailable    (transient: the worker died; retry)
BrokerUnavailableError      503   service_unavailable
MeshTimeoutError            504   timeout
EngineFailureError          500   server_error           (a real fault in the engine)

A 429 or 503 carries Retry-After: 1, which the SDK's retries honour.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from pydantic import ValidationError

from mesh import errors as mesh_errors

#: Statuses that say "try again shortly" (overloaded, no worker, no broker), and how shortly.
_RETRYABLE = frozenset({429, 503})
RETRY_AFTER_SECONDS = "1"


class ApiError(Exception):
    """A request that ends in an OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        return orjson.dumps(self.body())

    def response(self) -> web.Response:
        if self.status in _RETRYABLE:
            self.headers.setdefault("Retry-After", RETRY_AFTER_SECONDS)
        return web.Response(
            status=self.status, body=self.encode(), content_type="application/json", headers=self.headers
        )


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


_MESH_STATUS: list[tuple[type[mesh_errors.MeshError], int, str]] = [
    (mesh_errors.BadRequestError, 400, "invalid_request_error"),
    (mesh_errors.ModelNotFoundError, 404, "invalid_request_error"),
    (mesh_errors.OverloadedError, 429, "rate_limit_error"),
    (mesh_errors.WorkerLostError, 503, "service_unavailable"),
    (mesh_errors.EngineFailureError, 500, "server_error"),
    (mesh_errors.MeshTimeoutError, 504, "timeout"),
    (mesh_errors.BrokerUnavailableError, 503, "service_unavailable"),
]


def from_mesh_error(exc: mesh_errors.MeshError) -> ApiError:
    for cls, status, type_ in _MESH_STATUS:
        if isinstance(exc, cls):
            return ApiError(status, exc.message, type_, code=exc.code)
    # A request the mesh dropped for another reason (cancelled, a reader too slow): transient.
    return ApiError(503, exc.message, "service_unavailable", code=exc.code)


#: Type names pydantic adds to a path for union members (`prompt.str`, `prompt.list[str].0`).
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _is_union_tag(part: str | int) -> bool:
    """Whether a path part names a union member's type rather than a field (field names are snake_case)."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "-" in part or part[:1].isupper())


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, named by its field path (as OpenAI's `param`)."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("the request body must be a JSON object")
    param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
    if first["type"] == "missing":
        return bad_request(f"missing required field: {param}", param)
    count = exc.error_count()
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return bad_request(f"invalid value for {param}: {first['msg']}{more}", param)


_HTTP_MESSAGES = {
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "method not allowed on this route"),
    413: ("request_too_large", "the request body is larger than the gateway accepts"),
}


def from_http_exception(exc: web.HTTPException) -> ApiError:
    code, message = _HTTP_MESSAGES.get(exc.status, (None, exc.reason))
    if exc.status == 413:
        message = f"{message} ({exc.text})"
    type_ = "invalid_request_error" if exc.status < 500 else "server_error"
    error = ApiError(exc.status, message, type_, code=code)
    if "Allow" in exc.headers:
        error.headers["Allow"] = exc.headers["Allow"]  # RFC 9110: a 405 lists the methods that would work
    return error
