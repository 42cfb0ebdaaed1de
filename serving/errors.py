"""The serving package's one error hierarchy.

Every error a request can meet is a ``ServingError`` subclass carrying its HTTP ``status``, OpenAI's error
``type`` and ``code``, and the offending ``param`` where one is known. The engine raises these with a reason
and no wire field names (``param`` is filled in by the OpenAI layer, which knows whether the prompt came as
``messages`` or ``prompt``); one function, ``error_body``, renders them for JSON responses and SSE events alike.
"""

from __future__ import annotations

import json
from typing import Any

# Seconds a client is told to wait (Retry-After) before trying again: a full queue drains within a few decode
# steps of a few ms each, so 1 s; a loading model takes tens of seconds on the 2-core CI box (11 s for Ray
# alone), so 5 s between polls.
RETRY_AFTER_QUEUE_FULL_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5


class ServingError(Exception):
    """Base of all serving errors. Subclasses set ``status``, ``type`` and optionally ``code``."""

    status = 500
    type = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None  # seconds, sent as the Retry-After header (429, 503)

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


class RequestTooLargeError(InvalidRequestError):
    """A body over ``ServeConfig.max_body_bytes``: refused while reading, before any parsing."""

    status = 413
    code = "request_too_large"


class MethodNotAllowedError(InvalidRequestError):
    status = 405
    code = "method_not_allowed"


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
    retry_after = RETRY_AFTER_QUEUE_FULL_S


class ServiceUnavailableError(ServingError):
    status = 503
    type = "service_unavailable"
    retry_after = RETRY_AFTER_UNAVAILABLE_S


class NotReadyError(ServiceUnavailableError):
    code = "not_ready"


class ModelLoadError(ServiceUnavailableError):
    code = "model_load_failed"


class EngineDeadError(ServiceUnavailableError):
    pass


class InternalServerError(ServingError):
    """Anything unexpected: a 500 with a generic message (the details go to the log, not to the client)."""


def internal_error(request_id: str) -> InternalServerError:
    """The 500 for an unexpected exception: the request id lets an operator find its traceback in the log."""
    return InternalServerError(f"The server had an error while processing your request (request id {request_id}); "
                               "it has been logged.", code="internal_error")


def error_body(err: ServingError) -> dict[str, Any]:
    """OpenAI's ``{"error": {message, type, param, code}}`` for one error: the one renderer, used for JSON
    responses (``error_headers`` beside it) and, through ``error_event``, for SSE error events."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_headers(err: ServingError) -> dict[str, str]:
    return {"Retry-After": str(err.retry_after)} if err.retry_after is not None else {}


def error_event(err: ServingError) -> str:
    """The SSE event a stream that already sent its 200 ends with (followed by ``data: [DONE]``)."""
    return f"data: {json.dumps(error_body(err))}\n\n"
