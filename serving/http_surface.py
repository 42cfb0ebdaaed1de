"""What the FastAPI app shows besides the routes: OpenAI-shaped errors for everything FastAPI answers itself
(unknown route 404, wrong method 405, anything unexpected 500) and an OpenAPI document with the real request
and response bodies (the routes read raw bodies themselves, so FastAPI cannot see them), which schema fuzzers
such as schemathesis generate requests from."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServingError,
    error_body,
    error_headers,
    internal_error,
)
from serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)

logger = logging.getLogger("serving.request")
SCHEMAS = "#/components/schemas/{model}"


def error_response(err: ServingError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers={**error_headers(err), **(headers or {})})


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": SCHEMAS.format(model=model.__name__)}


def _errors(*codes: int) -> dict[int | str, Any]:
    return {c: {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
            for c in codes}


def json_body(request: type[BaseModel], response: type[BaseModel]) -> dict[str, Any]:
    """Route kwargs documenting a JSON request body and its answer (JSON, or SSE when ``stream`` is true)."""
    return {
        "openapi_extra": {"requestBody": {"required": True,
                                          "content": {"application/json": {"schema": _ref(request)}}}},
        "responses": {200: {"description": "The completion (JSON), or with `stream: true` server-sent events "
                                           "of chunks ending in `data: [DONE]`",
                            "content": {"application/json": {"schema": _ref(response)},
                                        "text/event-stream": {"schema": {"type": "string"}}}},
                      **_errors(400, 401, 404, 413, 429, 500, 503)},
    }


def models_doc() -> dict[str, Any]:
    return {"responses": {200: {"description": "The served model",
                                "content": {"application/json": {"schema": _ref(ModelList)}}}, **_errors(401, 500)}}


def text_doc(media_type: str, description: str, *errors: int) -> dict[str, Any]:
    return {"responses": {200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}},
                          **_errors(*errors)}}


def probe_doc(description: str) -> dict[str, Any]:
    return {"responses": {200: {"description": description,
                                "content": {"application/json": {"schema": {"type": "object"}}}}, **_errors(503)}}


DOC_MODELS: list[tuple[type[BaseModel], str]] = [
    (ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
    (ChatCompletionResponse, "serialization"), (CompletionResponse, "serialization"),
    (ModelList, "serialization"), (ErrorResponse, "serialization")]


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema(DOC_MODELS, ref_template=SCHEMAS)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """FastAPI's own answers in OpenAI's shape; ``on_error(status)`` counts them (``vllm:request_errors_total``)."""

    def count(status: int) -> None:
        if on_error is not None:
            on_error(status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            err: ServingError = NotFoundError(f"Unknown route {request.method} {request.url.path}",
                                              code="unknown_route")
        elif exc.status_code == 405:
            err = MethodNotAllowedError(f"Method {request.method} is not allowed on {request.url.path}"
                                        + (f" (allowed: {headers['allow']})" if "allow" in headers else ""))
        else:
            err = InvalidRequestError(str(exc.detail))
            err.status = exc.status_code
        count(err.status)
        return error_response(err, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        count(400)
        return error_response(InvalidRequestError(f"{param}: {first['msg']}" if param else first["msg"], param=param))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.headers.get("x-request-id") or "-"
        logger.error("request %s %s %s failed", rid, request.method, request.url.path, exc_info=exc)
        count(500)
        return error_response(internal_error(rid))
