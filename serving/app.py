"""Ray Serve application: one deployment per replica holding the FastAPI ingress and the LLM engine.

One deployment (not ingress + engine) keeps streaming in-process: tokens go from the engine thread to the
HTTP response without a second Ray hop. Replicas, GPUs, ``max_ongoing_requests`` and autoscaling come from
``ServeConfig.deployment``. Build with ``build_app(cfg)``; Serve YAML users can point ``import_path`` at
``serving.app:app_builder`` with ``args: {config: FILE}``.
"""

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from serving.config import ServeConfig, load_serve_config, resolve_model_path
from serving.engine import EngineError, LLMEngine, RequestStream, StepOutput
from serving.metrics import EngineMetrics
from serving.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UnsupportedFieldError,
    UsageInfo,
    make_id,
    now,
)

logger = logging.getLogger("serving.request")
WEB_INDEX = Path(__file__).parent / "web" / "index.html"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class APIError(Exception):
    """Rendered as OpenAI's ``{"error": {...}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             422: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, UnsupportedFieldError):
        return APIError(400, str(ctx_err), param=ctx_err.field, code="unsupported_parameter")
    if err["type"] == "extra_forbidden":
        return APIError(400, f"'{param}' is not a recognized or supported parameter", param=param,
                        code="unsupported_parameter")
    return APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param)


class ApiKeys:
    """Keys from env ``API_KEYS`` (comma-separated) and key files (one per line, '#' comments, re-read on change):
    ``ServeConfig.api_keys_files`` plus env ``API_KEYS_FILE``."""

    def __init__(self, files: list[str] | None = None) -> None:
        self.env_keys = {k.strip() for k in os.environ.get("API_KEYS", "").split(",") if k.strip()}
        self.files = list(dict.fromkeys([*(files or []), *([os.environ["API_KEYS_FILE"]]
                                                            if os.environ.get("API_KEYS_FILE") else [])]))
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
            raise APIError(401, "Incorrect API key provided." if token else "Missing API key (Authorization: "
                           "Bearer KEY).", code="invalid_api_key")


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
        from serving.engine import EngineOptions

        self.engine = LLMEngine(resolve_model_path(self.cfg.model), EngineOptions.from_config(self.cfg.engine),
                                tokenizer_path=self.cfg.tokenizer, chat_template=self.cfg.chat_template,
                                stats=self.metrics)
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
            return APIError(503, f"engine failed: {self.engine.error}").response()
        return JSONResponse({"status": "ok"})

    @api.get("/ready")
    async def ready(self) -> Response:
        if self.engine.ready.is_set() and self.engine.alive:
            return JSONResponse({"status": "ready", "model": self.model_name, **self.engine.load_stats()})
        return self._not_ready().response()

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/")
    async def index(self) -> Response:
        if WEB_INDEX.is_file():
            return FileResponse(WEB_INDEX, media_type="text/html")
        return APIError(404, "no web page installed (serving/web/index.html)").response()

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._guard(request, "models", self._models)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._guard(request, "chat", self._chat)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._guard(request, "completions", self._completions)

    # ------------------------------------------------------------------ plumbing
    def _not_ready(self) -> APIError:
        if self.engine.error is not None:
            return APIError(503, f"model failed to load: {self.engine.error}", code="model_load_failed")
        return APIError(503, "model is loading; retry shortly", code="not_ready")

    async def _guard(self, request: Request, endpoint: str, handler) -> Response:
        rid = request.headers.get("x-request-id") or make_id("req")
        t0 = time.monotonic()
        status = 200
        try:
            self.keys.check(request.headers.get("authorization"))
            resp = await handler(request, rid)
        except APIError as e:
            status, resp = e.status, e.response()
        except EngineError as e:
            status = e.status
            resp = APIError(e.status, str(e), param=e.param).response()
        except asyncio.CancelledError:
            status = 499
            self._log(rid, endpoint, status, t0)
            raise
        if status >= 400:
            self.metrics.error(status)
        self.metrics.http_requests.labels(self.model_name, endpoint, str(status)).inc()
        resp.headers["x-request-id"] = rid
        self._log(rid, endpoint, status, t0)
        return resp

    def _log(self, rid: str, endpoint: str, status: int, t0: float, **extra: Any) -> None:
        logger.info(json.dumps({"event": "request", "request_id": rid, "endpoint": endpoint, "status": status,
                                "latency_s": round(time.monotonic() - t0, 4), **extra}))

    async def _parse(self, request: Request, cls: type) -> Any:
        if not self.engine.ready.is_set() or not self.engine.alive:
            raise self._not_ready()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            req = cls.model_validate(body)
        except UnsupportedFieldError as e:
            raise APIError(400, str(e), param=e.field, code="unsupported_parameter") from None
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        return req

    async def _models(self, request: Request, rid: str) -> Response:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    def _render_chat(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        template = None if tok.chat_template else CHATML_TEMPLATE
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, chat_template=template)
        except Exception as e:  # noqa: BLE001 - a template's own error (e.g. role order) is the client's 400
            raise APIError(400, f"messages could not be rendered with the chat template: {e}", "messages") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def _submit(self, prompt_ids: list[int], req: Any, rid: str, param: str) -> list[RequestStream]:
        default = self.engine.max_model_len - len(prompt_ids)
        streams: list[RequestStream] = []
        try:
            for i in range(req.n):
                params = req.sampling_params(max(1, default), index=i)
                streams.append(self.engine.submit(prompt_ids, params, f"{rid}-{i}"))
        except EngineError as e:
            for s in streams:
                s.cancel()
            if e.status == 400:
                e.param = param
            raise
        return streams

    async def _merge(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
        """Interleave the choices' outputs; cancelling (client gone) aborts every sequence."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    q.put_nowait((i, out))
            except EngineError as e:
                q.put_nowait((i, e))
            q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, EngineError):
                    raise item
                else:
                    yield i, item
        finally:
            for s in streams:
                s.cancel()
            for t in tasks:
                t.cancel()

    def _chat_logprobs(self, out: StepOutput) -> ChatLogprobs | None:
        if out.logprobs is None:
            return None
        dec = self.engine.tokenizer.decode
        items = []
        for lp in out.logprobs:
            t = dec([lp.token_id])
            items.append(ChatLogprob(token=t, logprob=lp.logprob, bytes=list(t.encode()),
                                     top_logprobs=[TopLogprob(token=dec([i]), logprob=v, bytes=list(dec([i]).encode()))
                                                   for i, v in lp.top]))
        return ChatLogprobs(content=items)

    async def _chat(self, request: Request, rid: str) -> Response:
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        prompt_ids = self._render_chat(req)
        streams = self._submit(prompt_ids, req, rid, "messages")
        cid, created = make_id("chatcmpl"), now()
        if req.stream:
            return StreamingResponse(self._chat_stream(req, streams, prompt_ids, cid, created),
                                     media_type="text/event-stream", headers={"x-request-id": rid})
        texts = [""] * req.n
        finish: list[str | None] = [None] * req.n
        lps: list[list[ChatLogprob]] = [[] for _ in range(req.n)]
        completion = [0] * req.n
        async for i, out in self._merge(streams):
            texts[i] += out.text
            completion[i] = out.completion_tokens
            if out.finish_reason:
                finish[i] = out.finish_reason
            lp = self._chat_logprobs(out)
            if lp:
                lps[i].extend(lp.content)
        choices = [ChatCompletionChoice(index=i, message=ChatResponseMessage(content=texts[i]),
                                        logprobs=ChatLogprobs(content=lps[i]) if req.logprobs else None,
                                        finish_reason=finish[i]) for i in range(req.n)]
        usage = UsageInfo.of(len(prompt_ids), sum(completion))
        resp = ChatCompletionResponse(id=cid, created=created, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    async def _chat_stream(self, req: ChatCompletionRequest, streams: list[RequestStream], prompt_ids: list[int],
                           cid: str, created: int) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        usage_field = {} if include_usage else {"exclude": {"usage"}}

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            c = ChatCompletionStreamResponse(id=cid, created=created, model=self.model_name, choices=[choice])
            return f"data: {c.model_dump_json(**usage_field)}\n\n"

        completion = [0] * req.n
        try:
            for i in range(req.n):
                yield chunk(ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            async for i, out in self._merge(streams):
                completion[i] = out.completion_tokens
                if out.text or out.logprobs:
                    yield chunk(ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=out.text),
                                                           logprobs=self._chat_logprobs(out)))
                if out.finish_reason:
                    yield chunk(ChatCompletionStreamChoice(index=i, delta=DeltaMessage(),
                                                           finish_reason=out.finish_reason))
            if include_usage:
                usage = UsageInfo.of(len(prompt_ids), sum(completion))
                final = ChatCompletionStreamResponse(id=cid, created=created, model=self.model_name, choices=[],
                                                     usage=usage)
                yield f"data: {final.model_dump_json()}\n\n"
        except EngineError as e:
            self.metrics.error(e.status)
            err = ErrorResponse(error=ErrorInfo(message=str(e), type=APIError.TYPES.get(e.status, "error")))
            yield f"data: {err.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    async def _completions(self, request: Request, rid: str) -> Response:
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        if isinstance(req.prompt, str):
            prompt_ids = self.engine.tokenizer(req.prompt)["input_ids"]
        else:
            if any(not 0 <= t < self.engine.runner.vocab for t in req.prompt):
                raise APIError(400, "prompt token ids out of the vocabulary range", param="prompt")
            prompt_ids = list(req.prompt)
        streams = self._submit(prompt_ids, req, rid, "prompt")
        cid, created = make_id("cmpl"), now()
        if req.stream:
            return StreamingResponse(self._completion_stream(req, streams, prompt_ids, cid, created),
                                     media_type="text/event-stream", headers={"x-request-id": rid})
        texts = [""] * req.n
        finish: list[str | None] = [None] * req.n
        lps = [CompletionLogprobs() for _ in range(req.n)]
        completion = [0] * req.n
        async for i, out in self._merge(streams):
            self._add_completion_logprobs(lps[i], out, len(texts[i]))
            texts[i] += out.text
            completion[i] = out.completion_tokens
            finish[i] = out.finish_reason or finish[i]
        choices = [CompletionChoice(index=i, text=texts[i], logprobs=lps[i] if req.logprobs is not None else None,
                                    finish_reason=finish[i]) for i in range(req.n)]
        usage = UsageInfo.of(len(prompt_ids), sum(completion))
        return JSONResponse(CompletionResponse(id=cid, created=created, model=self.model_name, choices=choices,
                                               usage=usage).model_dump())

    def _add_completion_logprobs(self, acc: CompletionLogprobs, out: StepOutput, offset: int) -> None:
        if out.logprobs is None:
            return
        dec = self.engine.tokenizer.decode
        for lp in out.logprobs:
            t = dec([lp.token_id])
            acc.tokens.append(t)
            acc.token_logprobs.append(lp.logprob)
            acc.text_offset.append(offset)
            acc.top_logprobs.append({dec([i]): v for i, v in lp.top})
            offset += len(t)

    async def _completion_stream(self, req: CompletionRequest, streams: list[RequestStream], prompt_ids: list[int],
                                 cid: str, created: int) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion = [0] * req.n
        try:
            async for i, out in self._merge(streams):
                completion[i] = out.completion_tokens
                lp = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                    self._add_completion_logprobs(lp, out, 0)
                c = CompletionResponse(id=cid, created=created, model=self.model_name,
                                       choices=[CompletionChoice(index=i, text=out.text, logprobs=lp,
                                                                 finish_reason=out.finish_reason)])
                yield f"data: {c.model_dump_json(exclude={'usage'} if not include_usage else None)}\n\n"
            if include_usage:
                usage = UsageInfo.of(len(prompt_ids), sum(completion))
                c = CompletionResponse(id=cid, created=created, model=self.model_name, choices=[], usage=usage)
                yield f"data: {c.model_dump_json()}\n\n"
        except EngineError as e:
            self.metrics.error(e.status)
            err = ErrorResponse(error=ErrorInfo(message=str(e), type=APIError.TYPES.get(e.status, "error")))
            yield f"data: {err.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Ray Serve application for ``cfg`` (one deployment: ingress + engine)."""
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
    """Serve YAML entry: ``import_path: serving.app:app_builder``, ``args: {config: FILE, model: PATH?}``."""
    return build_app(load_serve_config(args.get("config"), args.get("overrides"), args.get("model")))
