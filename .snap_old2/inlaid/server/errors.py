"""OpenAI-style error bodies and the mapping from exceptions to HTTP statuses.

Invariants: every error the server sends has the body
``{"error": {"message", "type", "param", "code"}}``; ``message`` says what to fix.
Status rule (docs/server.md): 400 bad value / malformed JSON / invalid UTF-8 /
prompt too long, 401 API key, 404 unknown model or adapter, 413 body too large,
422 body does not fit the request schema, 503 queue full or shutting down,
500 engine failure.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from inlaid.engine.async_llm import (
    EngineOverloadedError,
    EngineShutdownError,
    EngineStepError,
    ModelNotFoundError,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, code)).encode()


def from_exception(exc: BaseException) -> APIError:
    """Map an engine/AsyncLLM exception to an APIError (unknown ones become 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), "model_not_found", "model")
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, f"server overloaded: {exc}", "queue_full")
    if isinstance(exc, EngineShutdownError):
        return APIError(503, str(exc), "shutting_down")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), "engine_error")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), "invalid_value")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
