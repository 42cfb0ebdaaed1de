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
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve

from serving import testing_hooks
from serving.config import ServeConfig, load_serve_config, resolve_model_path
from serving.engine import EngineOptions, LLMEngine
from serving.errors import (
    AuthenticationError,
    EngineDeadError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    QueueFullError,
    ServingError,
    internal_error,
)
from serving.http_surface import (
    error_response,
    install_error_handlers,
    install_openapi,
    json_body,
    models_doc,
    probe_doc,
    text_doc,
)
from serving.metrics import EngineMetrics
from serving.openai_serving import OpenAIServing
from serving.openai_serving_chat import OpenAIServingChat
from serving.openai_serving_completion import OpenAIServingCompletion
from serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    make_id,
    now,
)
from serving.request_limits import parse_json, read_body

logger = logging.getLogger("serving.request")
WEB_INDEX = Path(__file__).parent / "web" / "index.html"


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


# Defined before the ingress class: Ray Serve's ingress captures the names its methods use when it wraps it
# (a helper defined below the class was a NameError in the replica).
class _Place:
    """One admitted request's place in ``LLMServer.inflight``, given back once: when its answer is complete, or
    when it is garbage-collected (a stream whose client left before it started is never iterated, so no
    ``finally`` of it runs)."""

    def __init__(self, server: Any):
        self.server = server
        server.inflight += 1

    def release(self) -> None:
        if self.server is not None:
            self.server.inflight -= 1
            self.server = None

    __del__ = release


async def _release_after(chunks: AsyncIterator[str], place: _Place) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        place.release()


# /docs and /redoc are routes of their own below, answering only when ServeConfig.docs is on.
api = FastAPI(title="colossal-rlhf OpenAI-compatible server", docs_url=None, redoc_url=None)
install_openapi(api)
_replica_metrics: list[EngineMetrics] = []  # the replica's registry, for errors FastAPI answers before our routes
install_error_handlers(api, lambda status: _replica_metrics and _replica_metrics[0].error(status))


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
        _replica_metrics[:] = [self.metrics]
        # Parsing, validation and tokenization run here, off the event loop that streams tokens and answers
        # probes; admission (below) bounds how many requests can be queued for it.
        self.pool = ThreadPoolExecutor(self.cfg.request_workers, thread_name_prefix="request-prep")
        self.inflight = 0  # OpenAI requests admitted and not yet answered (streams: until their last byte)
        testing_hooks.install(self.metrics, [self.chat_serving, self.completion_serving])
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
            return
        # the grammar compiler's set-up (2.3 s for a 49k vocabulary on the CPU) here, not on the event loop at
        # the first structured request
        try:
            self.chat_serving.grammars()
        except ImportError as e:  # the serve extra brings xgrammar; without it only structured requests fail
            logger.warning("structured outputs unavailable: %s", e)

    def liveness_error(self) -> ServingError | None:
        """Why this replica should be restarted: the engine loop died, or it stopped coming round (a hang)."""
        e = self.engine
        if e.error is not None or not e.alive:
            return EngineDeadError(f"engine failed: {e.error}")
        stalled = time.monotonic() - e.heartbeat
        if e.ready.is_set() and stalled > self.cfg.engine_stall_timeout_s:
            return EngineDeadError(f"engine loop stalled: no iteration for {stalled:.1f} s (engine_stall_timeout_s="
                                   f"{self.cfg.engine_stall_timeout_s:g})", code="engine_stalled")
        return None

    async def check_health(self) -> None:
        err = self.liveness_error()
        if err is not None:
            raise RuntimeError(err.message)

    def __del__(self) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------------ probes, metrics, page
    @api.get("/health", **probe_doc("Liveness: the engine loop is running (503 when dead or stalled)"))
    async def health(self) -> Response:
        err = self.liveness_error()
        if err is not None:
            logger.error("health check failed: %s", err.message)
            return error_response(err)
        return JSONResponse({"status": "ok"})

    @api.get("/ready", **probe_doc("Readiness: the model is loaded and takes requests"))
    async def ready(self) -> Response:
        if self.engine.ready.is_set() and self.engine.alive:
            return JSONResponse({"status": "ready", "model": self.model_name, **self.engine.load_stats(),
                                 "memory_mib": self.engine.memory_report()})
        return error_response(self._not_ready())

    @api.get("/metrics", response_class=PlainTextResponse,
             **text_doc("text/plain", "Prometheus text exposition (version 0.0.4)"))
    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/", response_class=HTMLResponse, **text_doc("text/html", "The chat page", 404))
    async def index(self) -> Response:
        if WEB_INDEX.is_file():
            return FileResponse(WEB_INDEX, media_type="text/html")
        return error_response(NotFoundError("no web page installed (serving/web/index.html)"))

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> Response:
        if not self.cfg.docs:
            return error_response(NotFoundError("/docs is off (ServeConfig.docs)", code="unknown_route"))
        return get_swagger_ui_html(openapi_url="openapi.json", title=api.title)

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self) -> Response:
        if not self.cfg.docs:
            return error_response(NotFoundError("/redoc is off (ServeConfig.docs)", code="unknown_route"))
        return get_redoc_html(openapi_url="openapi.json", title=api.title)

    # ------------------------------------------------------------------ OpenAI API
    @api.get("/v1/models", **models_doc())
    async def models(self, request: Request) -> Response:
        return await self._guard(request, "models", self._models)

    @api.post("/v1/chat/completions", **json_body(ChatCompletionRequest, ChatCompletionResponse))
    async def chat(self, request: Request) -> Response:
        return await self._guard(request, "chat", self._endpoint(self.chat_serving))

    @api.post("/v1/completions", **json_body(CompletionRequest, CompletionResponse))
    async def completions(self, request: Request) -> Response:
        return await self._guard(request, "completions", self._endpoint(self.completion_serving))

    # ------------------------------------------------------------------ plumbing
    def _not_ready(self) -> ServingError:
        if self.engine.error is not None:
            return ModelLoadError(f"model failed to load: {self.engine.error}")
        return NotReadyError("model is loading; retry shortly")

    async def _guard(self, request: Request, endpoint: str, handler) -> Response:
        # Ray's proxy gives every request an x-request-id (the client's, or one it makes) and sends it back on the
        # response itself: setting it here too would send the header twice.
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
        except Exception:  # noqa: BLE001 - a bug must still answer in OpenAI's shape (and be logged whole, once)
            logger.exception("request %s failed", rid)
            resp = error_response(internal_error(rid))
        if resp.status_code >= 400:
            self.metrics.error(resp.status_code)
        self.metrics.http_requests.labels(self.model_name, endpoint, str(resp.status_code)).inc()
        self._log(rid, endpoint, resp.status_code, t0)
        return resp

    def _log(self, rid: str, endpoint: str, status: int, t0: float, **extra: Any) -> None:
        logger.info(json.dumps({"event": "request", "request_id": rid, "endpoint": endpoint, "status": status,
                                "latency_s": round(time.monotonic() - t0, 4), **extra}))

    def _admission_limit(self) -> int:
        return self.engine.num_slots + self.cfg.engine.max_waiting

    def _prepare(self, serving: OpenAIServing, raw: bytes, rid: str) -> Any:
        return serving.prepare(parse_json(raw, self.cfg.max_json_depth), rid)

    async def _offload(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def _endpoint(self, serving: OpenAIServing):
        async def handle(request: Request, rid: str) -> Response:
            if not self.engine.ready.is_set() or not self.engine.alive:
                raise self._not_ready()
            # Admission before the body is even read: a burst beyond the limit costs one comparison each.
            limit = self._admission_limit()
            if self.inflight >= limit:
                raise QueueFullError(f"the server is at capacity ({limit} requests running or waiting); retry later")
            place = _Place(self)
            try:
                raw = await read_body(request, self.cfg.max_body_bytes)
                # one trip to the pool per request: JSON, validation, prompt rendering and tokenization
                req, ctx = await self._offload(self._prepare, serving, raw, rid)
                result = await serving.run(req, ctx)
            except BaseException:
                place.release()
                raise
            if isinstance(result, BaseModel):
                place.release()
                return JSONResponse(result.model_dump())
            return StreamingResponse(_release_after(result, place), media_type="text/event-stream")

        return handle

    async def _models(self, request: Request, rid: str) -> Response:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Ray Serve application for ``cfg`` (one deployment: ingress + engine). As a Serve YAML
    ``import_path``, Ray validates the ``args`` into ``ServeConfig`` through this annotation."""
    d = cfg.deployment
    max_ongoing, max_queued = cfg.serve_limits()
    opts: dict[str, Any] = {
        "name": d.name, "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
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
