"""Exceptions a mesh client raises, one per protocol error code, in a hierarchy.

MeshError
├── RequestError            the request itself was refused or failed
│   ├── BadRequestError         bad_request
│   │   └── ContextLengthError      context_length_exceeded
│   ├── ModelNotFoundError      model_not_found
│   ├── OverloadedError         overloaded
│   ├── WorkerLostError         worker_lost
│   ├── EngineFailureError      internal
│   └── ForbiddenError          forbidden (the client's key was revoked)
├── MeshTimeoutError        no answer within the timeout
└── BrokerUnavailableError  the broker is down or unreachable
"""

from __future__ import annotations

from mesh.protocol import ErrorCode


class MeshError(Exception):
    code: str = "mesh_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(MeshError):
    pass


class BadRequestError(RequestError):
    code = ErrorCode.BAD_REQUEST.value


class ContextLengthError(BadRequestError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED.value


class ModelNotFoundError(RequestError):
    code = ErrorCode.MODEL_NOT_FOUND.value


class OverloadedError(RequestError):
    code = ErrorCode.OVERLOADED.value


class WorkerLostError(RequestError):
    code = ErrorCode.WORKER_LOST.value


class EngineFailureError(RequestError):
    code = ErrorCode.INTERNAL.value


class ForbiddenError(RequestError):
    code = ErrorCode.FORBIDDEN.value


class MeshTimeoutError(MeshError):
    code = "timeout"


class BrokerUnavailableError(MeshError):
    code = "broker_unavailable"


_BY_CODE: dict[ErrorCode, type[RequestError]] = {
    ErrorCode.BAD_REQUEST: BadRequestError,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: ContextLengthError,
    ErrorCode.MODEL_NOT_FOUND: ModelNotFoundError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.WORKER_LOST: WorkerLostError,
    ErrorCode.INTERNAL: EngineFailureError,
    ErrorCode.CANCELLED: RequestError,
    ErrorCode.WORKER_UNAVAILABLE: OverloadedError,
    ErrorCode.FORBIDDEN: ForbiddenError,
}


def error_for_code(code: ErrorCode, message: str) -> RequestError:
    return _BY_CODE[code](message)
