"""The serving package's one error hierarchy.

Every error a request can meet is a ``ServingError`` subclass carrying its HTTP ``status``, OpenAI's error
``type`` and ``code``, and the offending ``param`` where one is known. The engine raises these with a reason
and no wire field names (``param`` is filled in by the OpenAI layer, which knows whether the prompt came as
``messages`` or ``prompt``); one function, ``error_body``, renders them for JSON responses and SSE events alike.
"""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """Base of all serving errors. Subclasses set ``status``, ``type`` and optionally ``code``."""

    status = 500
    type = "server_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


# Kept as the engine-side name: the engine raises EngineError subclasses (no HTTP knowledge needed to do so).
EngineError = ServingError


class InvalidRequestError(ServingError):
    status = 400
    type = "invalid_request_error"


class UnsupportedFieldError(InvalidRequestError):
    """A field the server does not implement and that would change the output: never silently ignored."""

    code = "unsupported_parameter"

    def __init__(self, field: str, message: str | None = None):
        super().__init__(message or f"'{field}' is not supported by this server", param=field)
        self.field = field


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(ServingError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(ServingError):
    status = 404
    type = "not_found_error"


class QueueFullError(ServingError):
    status = 429
    type = "rate_limit_exceeded"


class ServiceUnavailableError(ServingError):
    status = 503
    type = "service_unavailable"


class EngineDeadError(ServiceUnavailableError):
    pass


def error_body(err: ServingError) -> dict[str, Any]:
    """OpenAI's ``{"error": {message, type, param, code}}`` for one error (JSON body or SSE ``data:`` payload)."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
