"""/openapi.json, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateways.openai import schemas
from mesh import __version__

_REF = "#/components/schemas/{model}"
_ERROR_STATUSES = {
    "400": "invalid request: bad JSON, wrong content type, a missing or invalid field, an unsupported parameter, "
    "a prompt over the context",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "413": "body larger than --max-body-size",
    "429": "every worker is busy and the queue is full",
    "500": "a fault in an engine",
    "503": "no broker, the worker was lost, or no live worker serves a model that was served before",
    "504": "no answer within --timeout",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {code: {"description": _ERROR_STATUSES[code], "content": _json(schemas.ErrorResponse)} for code in statuses}


def _sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: its data is a JSON chunk, an error object, or the final `[DONE]`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "description": f"a {chunk.__name__} as JSON; an ErrorResponse as JSON if generation failed after "
                "the stream began; `[DONE]` last",
                # Not contentMediaType: the final `[DONE]` is not JSON.
                "x-json-schema": _REF.format(model=chunk.__name__),
            },
        },
    }


def _generation(summary: str, request: type[BaseModel], reply: type[BaseModel], chunk: type[BaseModel]) -> dict:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {}],
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": "the completion; with stream=true, server-sent events of chunks, then [DONE]",
                    "content": {**_json(reply), "text/event-stream": {"schema": _sse_event(chunk)}},
                },
                **_errors("400", "401", "404", "413", "429", "500", "503", "504"),
            },
        }
    }


def build_openapi() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (schemas.ChatCompletionRequest, "validation"),
        (schemas.CompletionRequest, "validation"),
        *(
            (m, "serialization")
            for m in (
                schemas.ChatCompletion,
                schemas.ChatCompletionChunk,
                schemas.Completion,
                schemas.ModelList,
                schemas.ModelCard,
                schemas.ErrorResponse,
                schemas.Health,
            )
        ),
    ]
    _, top = models_json_schema(models, ref_template=_REF)
    components = top.get("$defs", {})
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    paths = {
        "/v1/models": {
            "get": {
                "summary": "the models live workers serve",
                "security": [{"bearer": []}, {}],
                "responses": {
                    "200": {"description": "model list", "content": _json(schemas.ModelList)},
                    **_errors("401"),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "one model",
                "security": [{"bearer": []}, {}],
                "parameters": [model_param],
                "responses": {
                    "200": {"description": "the model", "content": _json(schemas.ModelCard)},
                    **_errors("401", "404"),
                },
            }
        },
        "/v1/chat/completions": _generation(
            "chat completion", schemas.ChatCompletionRequest, schemas.ChatCompletion, schemas.ChatCompletionChunk
        ),
        "/v1/completions": _generation(
            "text completion", schemas.CompletionRequest, schemas.Completion, schemas.Completion
        ),
        "/health": {
            "get": {
                "summary": "200 while the gateway hears the broker",
                "responses": {
                    "200": {"description": "healthy", "content": _json(schemas.Health)},
                    "503": {"description": "no broker", "content": _json(schemas.Health)},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [{"bearer": []}, {}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("401"),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-mesh OpenAI-compatible gateway", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_bytes() -> bytes:
    return orjson.dumps(build_openapi())
