"""The thin HTTP layer: FastAPI routes, API keys, probes, and the Ray Serve ingress deployment (``build_app``).

One deployment per replica holds the FastAPI ingress and the LLM engine (not ingress + engine): streaming
stays in-process, tokens go from the engine thread to the HTTP response without a second Ray hop. Replicas,
GPUs, ``max_ongoing_requests`` and autoscaling come from ``ServeConfig.deployment``. Build with
``build_app(cfg)``; Serve YAML / KubeRay users point ``import_path`` at ``serving.api_router:build_app`` (args:
the ServeConfig itself) or ``serving.api_router:app_builder`` (args: ``{config: FILE, model: PATH?}``);
``serving.app`` keeps both importable under the old name.

The endpoints' logic lives in ``serving/openai_serving*.py``; errors are ``serving.errors.ServingError``
subclasses, rendered here as JSON by ``error_body`` (with ``Retry-After`` on 429 and 503).
"""

# No `from __future__ import annotations` here: Ray Serve's class ingress would read `request: Request` as a
# query parameter and answer 422 to every POST (seen 2026-11-23, tests/cpu/test_loadtest_serving.py).

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve

from serving.config import ServeConfig, load_serve_config, resolve_model_path
from serving.engine import EngineOptions, LLMEngine
from serving.errors import (
    AuthenticationError,
    InternalServerError,
    InvalidRequestError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    ServiceUnavailableError,
    ServingError,
    error_body,
    error_headers,
)
from serving.metrics import EngineMetrics
from serving.openai_serving import OpenAIServing
from serving.openai_serving_chat import OpenAIServingChat
from serving.openai_serving_completion import OpenAIServingCompletion
from serving.protocol import ModelCard, ModelList, make_id, now

logger = logging.getLogger("serving.request")
WEB_INDEX = Path(__file__).parent / "web" / "index.html"


def error_response(err: ServingError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=error_headers(err))


class ApiKeys:
    """Keys from env ``API_KEYS`` (comma-separated) and key files (one per line, '#' comments, re-read on change):
    ``ServeConfig.api_keys_files`` plus env ``API_KEYS_FILE``. ``python -m serving`` turns env ``API_KEYS`` into
    such a file before Ray starts, so keys never travel in a Ray runtime env (which Ray logs)."""

    def __init__(self, files: list[str] | None = None) -> None:
        self.env_keys = {k.strip() for k in os.environ.get("API_KEYS", "").split(",") if k.strip()}
        env_file = [os.environ["API_KEYS_FILE"]] if os.environ.get("API_KEYS_FILE") else []
        self.files = list(dict.fromkeys([*(files or []), *env_file]))
        self._mtimes: dict[str, float] = {}
        self._file_keys: dict[str, set[str]] = {}
        self._reload()

    def _reload(self) -> None:
        for path in self.files:
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            if mtime != self._mtimes.get(path):
                text = Path(path).read_text(encoding="utf-8")
                self._file_keys[path] = {x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")}
                self._mtimes[path] = mtime

    @property
    def enabled(self) -> bool:
        return bool(self.env_keys or self.files)

    def check(self, header: str | None) -> None:
        if not self.enabled:
            return
        self._reload()
        token = header[7:].strip() if header and header.lower().startswith("bearer ") else None
        if not token or not any(token in keys for keys in (self.env_keys, *self._file_keys.values())):
            raise AuthenticationError("Incorrect API key provided." if token else "Missing API key "
                                      "(Authorization: Bearer KEY).")


api = FastAPI(title="colossal-rlhf OpenAI-compatible server")


@serve.ingress(api)
class LLMServer:
    """One replica: engine + OpenAI routes. Loading runs in the background so liveness answers at once."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(config)
        logging.basicConfig(level=self.cfg.log_level, format="%(message)s")
        self.model_name = self.cfg.model_name
        self.metrics = EngineMetrics(self.model_name)
        self.keys = ApiKeys(self.cfg.api_keys_files)
        self.engine = LLMEngine(resolve_model_path(self.cfg.model), EngineOptions.from_config(self.cfg.engine),
                                tokenizer_path=self.cfg.tokenizer, chat_template=self.cfg.chat_template,
                                stats=self.metrics)
        self.chat_serving = OpenAIServingChat(self.engine, self.model_name, self.metrics)
        self.completion_serving = OpenAIServingCompletion(self.engine, self.model_name, self.metrics)
        self.created = now()
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            self.engine.load_and_start()
            e = self.engine
            self.metrics.cache_config.labels(self.model_name, str(e.num_slots), str(e.max_model_len),
                                             e.info.get("kv_cache_dtype", "")).set(1)
        except BaseException:  # noqa: BLE001 - recorded in engine.error, reported by /ready and check_health
            logger.exception("model load failed")

    async def check_health(self) -> None:
        if self.engine.error is not None or not self.engine.alive:
            raise RuntimeError(f"engine failed: {self.engine.error}")

    def __del__(self) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------------ probes, metrics, page
    @api.get("/health")
    async def health(self) -> Response:
        if self.engine.error is not None or not self.engine.alive:
            return error_response(ServiceUnavailableError(f"engine failed: {self.engine.error}"))
        return JSONResponse({"status": "ok"})

    @api.get("/ready")
    async def ready(self) -> Response:
        if self.engine.ready.is_set() and self.engine.alive:
            return JSONResponse({"status": "ready", "model": self.model_name, **self.engine.load_stats()})
        return error_response(self._not_ready())

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/")
    async def index(self) -> Response:
        if WEB_INDEX.is_file():
            return FileResponse(WEB_INDEX, media_type="text/html")
        return error_response(NotFoundError("no web page installed (serving/web/index.html)"))

    # ------------------------------------------------------------------ OpenAI API
    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._guard(request, "models", self._models)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._guard(request, "chat", self._endpoint(self.chat_serving))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._guard(request, "completions", self._endpoint(self.completion_serving))

    # ------------------------------------------------------------------ plumbing
    def _not_ready(self) -> ServingError:
        if self.engine.error is not None:
            return ModelLoadError(f"model failed to load: {self.engine.error}")
        return NotReadyError("model is loading; retry shortly")

    async def _guard(self, request: Request, endpoint: str, handler) -> Response:
        rid = request.headers.get("x-request-id") or make_id("req")
        t0 = time.monotonic()
        try:
            self.keys.check(request.headers.get("authorization"))
            resp = await handler(request, rid)
        except ServingError as e:
            resp = error_response(e)
        except asyncio.CancelledError:
            self._log(rid, endpoint, 499, t0)
            raise
        except Exception:  # noqa: BLE001 - a bug must still answer in OpenAI's shape (and be logged whole)
            logger.exception("request %s failed", rid)
            resp = error_response(InternalServerError("internal server error"))
        if resp.status_code >= 400:
            self.metrics.error(resp.status_code)
        self.metrics.http_requests.labels(self.model_name, endpoint, str(resp.status_code)).inc()
        resp.headers["x-request-id"] = rid
        self._log(rid, endpoint, resp.status_code, t0)
        return resp

    def _log(self, rid: str, endpoint: str, status: int, t0: float, **extra: Any) -> None:
        logger.info(json.dumps({"event": "request", "request_id": rid, "endpoint": endpoint, "status": status,
                                "latency_s": round(time.monotonic() - t0, 4), **extra}))

    def _endpoint(self, serving: OpenAIServing):
        async def handle(request: Request, rid: str) -> Response:
            if not self.engine.ready.is_set() or not self.engine.alive:
                raise self._not_ready()
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
            result = await serving.create(body, rid)
            if isinstance(result, BaseModel):
                return JSONResponse(result.model_dump())
            return StreamingResponse(result, media_type="text/event-stream", headers={"x-request-id": rid})

        return handle

    async def _models(self, request: Request, rid: str) -> Response:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Ray Serve application for ``cfg`` (one deployment: ingress + engine). As a Serve YAML
    ``import_path``, Ray validates the ``args`` into ``ServeConfig`` through this annotation."""
    d = cfg.deployment
    opts: dict[str, Any] = {
        "name": d.name, "max_ongoing_requests": d.max_ongoing_requests, "max_queued_requests": d.max_queued_requests,
        "health_check_period_s": d.health_check_period_s, "health_check_timeout_s": d.health_check_timeout_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_gpus": d.num_gpus, "num_cpus": d.num_cpus},
    }
    if d.autoscaling is not None:
        opts["autoscaling_config"] = d.autoscaling.to_ray()
    else:
        opts["num_replicas"] = d.num_replicas
    return serve.deployment(LLMServer).options(**opts).bind(cfg.model_dump())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve YAML entry: ``import_path: serving.api_router:app_builder``, ``args: {config: FILE, model: PATH?}``."""
    return build_app(load_serve_config(args.get("config"), args.get("overrides"), args.get("model")))
