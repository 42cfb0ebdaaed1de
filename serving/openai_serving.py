"""The OpenAI endpoints' shared logic: parse -> render prompt -> submit -> merge choices -> stream or collect.

``OpenAIServing.create(body, request_id)`` runs one request through those steps and returns either a response
model (pydantic; the router sends it as JSON) or an async iterator of SSE lines (the router streams it).
``serving/openai_serving_chat.py`` and ``serving/openai_serving_completion.py`` subclass it with only their
prompt builder (``render_prompt``) and choice builders (``build_response``, ``stream_chunks``, ...).
No HTTP here: the router (``serving/api_router.py``) owns routes, auth, probes and turns responses into bytes.

Errors: every step raises ``serving.errors.ServingError`` subclasses. The engine raises them without wire
field names; ``submit`` names the field the prompt came in (``prompt_param``: ``messages`` or ``prompt``).
A stream that already answered 200 ends with one SSE error event rendered by ``serving.errors.error_event``.

Extension points (where tool calling and structured outputs plug in, see ``RequestHooks``):
- ``OpenAIServing.request_hooks(req)`` is called once per request, after parsing and before the prompt is
  rendered. It turns request features (a chat request's ``tools``/``tool_choice``/``response_format``) into a
  ``RequestHooks`` holding
  (a) ``template_kwargs``: extra keyword arguments for ``tokenizer.apply_chat_template`` (e.g.
      ``tools=[...]``), merged in by the chat prompt builder;
  (b) ``logits_processors(index)``: fresh per-sequence logits processors (e.g. a grammar matcher's token
      mask) for choice ``index``, passed to the engine in ``SamplingParams.logits_processors`` (see
      ``serving/sampler.py`` for their contract: called per decode step with the sequence's generated ids);
  (c) ``output_parser()``: a fresh per-choice post-processor of the generated text (e.g. tool-call parsing),
      which the chat choice builders use for streamed deltas and for the collected message alike
      (``serving.openai_serving_chat.OutputParser``).
  The default hooks change nothing.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.engine import LLMEngine, RequestStream, StepOutput
from serving.errors import (
    InvalidRequestError,
    NotFoundError,
    ServingError,
    UnsupportedFieldError,
    error_event,
    internal_error,
)
from serving.metrics import EngineMetrics
from serving.protocol import UsageInfo, make_id, now
from serving.sampler import LogitsProcessor

logger = logging.getLogger("serving.request")

# Line breaks that JSON leaves raw inside strings but that ``str.splitlines`` (httpx's ``iter_lines``, many SSE
# readers) splits on: one in a streamed token would cut its ``data:`` line in two. Escaped, the JSON is the same.
_SSE_UNSAFE = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(json_text: str) -> str:
    """One SSE ``data:`` event for a JSON document, kept on one line for every line splitter."""
    return f"data: {json_text.translate(_SSE_UNSAFE)}\n\n"


def _no_processors(index: int) -> list[LogitsProcessor]:
    return []


@dataclass
class RequestHooks:
    """What a request's optional features add to the default flow (see the module docstring)."""

    template_kwargs: dict[str, Any] = field(default_factory=dict)
    logits_processors: Callable[[int], list[LogitsProcessor]] = _no_processors
    output_parser: Callable[[], Any] | None = None  # None: the endpoint's default parser


@dataclass
class RequestContext:
    """One request on its way through ``create``: what the builders need besides the request itself."""

    request_id: str
    response_id: str
    created: int
    prompt_ids: list[int]
    hooks: RequestHooks
    n: int
    parsers: list[Any] = field(default_factory=list)  # one output parser per choice (chat)
    completion_tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # of the first choice's admission: the prompt is counted once, so is its cache hit

    def usage(self) -> UsageInfo:
        return UsageInfo.of(len(self.prompt_ids), sum(self.completion_tokens), self.cached_tokens)

    def record(self, i: int, out: Any) -> None:
        """One choice's StepOutput: its token count, and the prompt's cache hit (the first choice's)."""
        self.completion_tokens[i] = out.completion_tokens
        if i == 0:
            self.cached_tokens = out.cached_tokens


@dataclass
class ChoiceResult:
    """Everything one choice produced, for the non-streamed builders."""

    index: int
    outputs: list[StepOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def finish_reason(self) -> str | None:
        return next((o.finish_reason for o in reversed(self.outputs) if o.finish_reason), None)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into ``loc`` (``prompt.list[int].0``): not a field of the body."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "(" in part)


def validation_error(e: ValidationError) -> InvalidRequestError:
    """pydantic's first complaint as a 400 naming the field (``messages.0.role``)."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"] if not _union_tag(p)) or None
    if err["type"] == "extra_forbidden":
        return UnsupportedFieldError(param, f"'{param}' is not a recognized or supported parameter")
    return InvalidRequestError(f"{param}: {err['msg']}" if param else err["msg"], param=param)


class OpenAIServing:
    """Base of the per-endpoint logic; subclasses set the class attributes and implement the builders."""

    request_cls: type[BaseModel]
    prompt_param: str  # the wire field the prompt came in: engine errors about the prompt are reported on it
    id_prefix: str

    def __init__(self, engine: LLMEngine, model_name: str, metrics: EngineMetrics):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics

    # ------------------------------------------------------------------ the flow
    async def create(self, body: Any, request_id: str,
                     offload: Callable[..., Awaitable[Any]] | None = None) -> BaseModel | AsyncIterator[str]:
        """``offload(fn, *args)`` runs the CPU-bound part (validation, prompt rendering, tokenization) elsewhere:
        the router passes its worker pool, so a big or slow request never holds up the event loop."""
        if offload is None:
            req, ctx = self.prepare(body, request_id)
        else:
            req, ctx = await offload(self.prepare, body, request_id)
        return await self.run(req, ctx)

    async def run(self, req: Any, ctx: RequestContext) -> BaseModel | AsyncIterator[str]:
        """Submit a prepared request and stream or collect it (on the event loop the engine delivers to)."""
        streams = self.submit(ctx, req)
        if req.stream:
            return self._stream(req, ctx, streams)
        return await self._collect(req, ctx, streams)

    def prepare(self, body: Any, request_id: str) -> tuple[Any, RequestContext]:
        """Parse, pick the hooks, render and tokenize the prompt: thread-safe, no event loop needed."""
        req = self.parse(body)
        hooks = self.request_hooks(req)
        prompt_ids = self.render_prompt(req, hooks)
        if not prompt_ids:  # checked here: the engine's own check is not a client error (it has no status 400)
            raise InvalidRequestError("the prompt is empty", param=self.prompt_param)
        ctx = RequestContext(request_id, make_id(self.id_prefix), now(), prompt_ids, hooks, req.n,
                             completion_tokens=[0] * req.n)
        ctx.parsers = [self.new_output_parser(ctx) for _ in range(req.n)]
        return req, ctx

    def parse(self, body: Any) -> Any:
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        try:
            # strict: OpenAI's types as JSON gives them ("10" is no integer, "yes" no boolean, false no token id)
            req = self.request_cls.model_validate(body, strict=True)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != self.model_name:
            raise NotFoundError(f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        return req

    def request_hooks(self, req: Any) -> RequestHooks:
        """Extension point (a)-(c) of the module docstring; the default changes nothing."""
        return RequestHooks()

    def render_prompt(self, req: Any, hooks: RequestHooks) -> list[int]:
        raise NotImplementedError

    def new_output_parser(self, ctx: RequestContext) -> Any:
        return ctx.hooks.output_parser() if ctx.hooks.output_parser is not None else None

    def sampling_params(self, req: Any, ctx: RequestContext, index: int) -> Any:
        default = max(1, self.engine.max_model_len - len(ctx.prompt_ids))
        params = req.sampling_params(default, index=index)
        vocab = self.engine.runner.vocab
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {vocab}",
                                      param="stop_token_ids")
        if params.min_tokens:
            params.all_stop_token_ids = sorted(set(getattr(self.engine, "eos_ids", ())) | set(params.stop_token_ids))
        params.logits_processors = list(ctx.hooks.logits_processors(index))
        return params

    def submit(self, ctx: RequestContext, req: Any) -> list[RequestStream]:
        all_params = [self.sampling_params(req, ctx, i) for i in range(req.n)]
        streams: list[RequestStream] = []
        try:
            for i, params in enumerate(all_params):
                streams.append(self.engine.submit(ctx.prompt_ids, params, f"{ctx.request_id}-{i}"))
        except ServingError as e:
            for s in streams:
                s.cancel()
            if e.status == 400:  # the engine names no wire field: the prompt is what it judged
                e.param = self.prompt_param
            raise
        return streams

    async def _merge(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
        """Interleave the choices' outputs; cancelling (client gone) aborts every sequence."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    q.put_nowait((i, out))
            except ServingError as e:
                q.put_nowait((i, e))
            q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, ServingError):
                    raise item
                else:
                    yield i, item
        finally:
            for s in streams:
                s.cancel()
            for t in tasks:
                t.cancel()

    async def _collect(self, req: Any, ctx: RequestContext, streams: list[RequestStream]) -> BaseModel:
        results = [ChoiceResult(i) for i in range(req.n)]
        async for i, out in self._merge(streams):
            results[i].outputs.append(out)
            ctx.record(i, out)
        return self.build_response(req, ctx, results)

    async def _stream(self, req: Any, ctx: RequestContext, streams: list[RequestStream]) -> AsyncIterator[str]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts.continuous_usage_stats)  # vLLM's: usage so far in every chunk
        dump: dict[str, Any] = {} if include_usage else {"exclude": {"usage"}}

        def sse(chunk: BaseModel) -> str:
            if continuous:
                chunk.usage = ctx.usage()
            return sse_event(chunk.model_dump_json(**dump))

        try:
            for chunk in self.stream_start(req, ctx):
                yield sse(chunk)
            async for i, out in self._merge(streams):
                ctx.record(i, out)
                for chunk in self.stream_chunks(req, ctx, i, out):
                    yield sse(chunk)
            if include_usage:
                yield sse_event(self.usage_chunk(ctx).model_dump_json())
        except ServingError as e:
            self.metrics.error(e.status)
            yield error_event(e)
        except Exception:  # noqa: BLE001 - after the 200 a bug can only end the stream, in OpenAI's shape
            logger.exception("request %s failed while streaming", ctx.request_id)
            self.metrics.error(500)
            yield error_event(internal_error(ctx.request_id))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ builders (per endpoint)
    def build_response(self, req: Any, ctx: RequestContext, results: list[ChoiceResult]) -> BaseModel:
        raise NotImplementedError

    def stream_start(self, req: Any, ctx: RequestContext) -> list[BaseModel]:
        return []

    def stream_chunks(self, req: Any, ctx: RequestContext, index: int, out: StepOutput) -> list[BaseModel]:
        raise NotImplementedError

    def usage_chunk(self, ctx: RequestContext) -> BaseModel:
        raise NotImplementedError

    def decode_token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])
