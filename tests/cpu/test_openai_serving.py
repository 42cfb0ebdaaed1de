"""The OpenAI layer's flow and its extension points on a real in-process engine (tiny random model, no HTTP):
request hooks reach the chat template, the sampler (per-sequence logits processors) and the output parser, for
streamed and collected answers alike; errors render one way for JSON and SSE."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from serving.engine import EngineOptions, LLMEngine
from serving.errors import (
    ContextLengthError,
    InvalidRequestError,
    QueueFullError,
    error_body,
    error_event,
    error_headers,
)
from serving.metrics import EngineMetrics
from serving.openai_serving import RequestHooks
from serving.openai_serving_chat import OpenAIServingChat, OutputParser
from serving.openai_serving_completion import OpenAIServingCompletion
from serving.protocol import DeltaMessage

MODEL = "tiny"
# a template that shows whether the hook's extra input reached it
TEMPLATE = ("{% if tools %}<|im_start|>system\nTOOLS: {{ tools | tojson }}<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    eng = LLMEngine(tiny_model, EngineOptions(device="cpu", max_model_len=128, max_num_seqs=4, max_waiting=2,
                                              warmup=False), chat_template=TEMPLATE)
    eng.load_and_start()
    yield eng
    eng.shutdown()


class Upper(OutputParser):
    """Holds everything back while streaming, answers upper-cased, reports a finish reason of its own."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> DeltaMessage | None:
        self.held += text
        return None

    def finish(self, finish_reason: str):
        return DeltaMessage(content=self.held.upper()), "tool_calls"

    def parse(self, text: str, finish_reason: str | None):
        message, _ = super().parse(text.upper(), finish_reason)
        return message, "tool_calls"


class Hooked(OpenAIServingChat):
    forced: int = 0
    seen_prompts: list[list[int]] = []

    def request_hooks(self, req):
        def only_forced(index: int):
            def proc(output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
                out = torch.full_like(row, float("-inf"))
                out[self.forced + index] = 0.0
                return out
            return [proc]

        return RequestHooks(template_kwargs={"tools": [{"name": "f"}]}, logits_processors=only_forced,
                            output_parser=Upper)

    def render_prompt(self, req, hooks):
        ids = super().render_prompt(req, hooks)
        self.seen_prompts.append(ids)
        return ids


def _body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kw}


async def _collect_stream(it) -> list[dict]:
    return [json.loads(line[6:]) async for line in it if line.startswith("data: {")]


def test_hooks_reach_template_sampler_and_parser(engine: LLMEngine):
    plain = OpenAIServingChat(engine, MODEL, EngineMetrics(MODEL))
    hooked = Hooked(engine, MODEL, EngineMetrics(MODEL))
    hooked.forced = engine.tokenizer.convert_tokens_to_ids("<s>") + 10  # an ordinary token, never EOS

    async def run():
        base = await plain.create(_body(temperature=0), "r0")
        resp = await hooked.create(_body(temperature=1.0, n=2, ignore_eos=True), "r1")
        chunks = await _collect_stream(await hooked.create(_body(stream=True, ignore_eos=True), "r2"))
        return base, resp, chunks

    base, resp, chunks = asyncio.run(run())
    assert len(hooked.seen_prompts[0]) > base.usage.prompt_tokens  # (a) the template saw `tools`
    for c in resp.choices:  # (b) each choice's own processor decided every token; (c) the parser rewrote it
        want = engine.tokenizer.decode([hooked.forced + c.index] * 4, skip_special_tokens=True).upper()
        assert c.message.content == want and c.finish_reason == "tool_calls"
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert deltas[0] == ""  # the role chunk, then nothing until the parser lets go
    text = engine.tokenizer.decode([hooked.forced] * 4, skip_special_tokens=True).upper()
    assert [d for d in deltas[1:] if d] == [text]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_completions_and_engine_errors_name_the_prompt_field(engine: LLMEngine):
    comp = OpenAIServingCompletion(engine, MODEL, EngineMetrics(MODEL))
    chat = OpenAIServingChat(engine, MODEL, EngineMetrics(MODEL))

    async def run():
        r = await comp.create({"model": MODEL, "prompt": "Two plus", "max_tokens": 3, "temperature": 0}, "c")
        with pytest.raises(InvalidRequestError) as empty:
            await comp.create({"model": MODEL, "prompt": ""}, "empty")
        assert empty.value.param == "prompt" and empty.value.status == 400
        errors = []
        for serving, body in ((comp, {"model": MODEL, "prompt": "x", "max_tokens": 500}),
                              (chat, _body(max_tokens=500))):
            with pytest.raises(ContextLengthError) as e:
                await serving.create(body, "too-long")
            errors.append(e.value)
        return r, errors

    r, errors = asyncio.run(run())
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert [e.param for e in errors] == ["prompt", "messages"]  # the engine names no wire field; this layer does


def test_one_renderer_for_json_and_sse():
    e = QueueFullError("busy")
    assert error_body(e) == {"error": {"message": "busy", "type": "rate_limit_exceeded", "param": None,
                                       "code": None}}
    assert error_headers(e) == {"Retry-After": "1"}
    event = error_event(e)
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == error_body(e)
    assert error_headers(ContextLengthError("x")) == {}


class LineBreaking(OutputParser):
    """Streams every piece with the three line breaks JSON leaves raw (U+0085, U+2028, U+2029) appended."""

    def feed(self, text: str) -> DeltaMessage | None:
        return DeltaMessage(content=text + "\u0085\u2028\u2029")


class Breaking(OpenAIServingChat):
    def request_hooks(self, req):
        return RequestHooks(output_parser=LineBreaking)


def test_streamed_text_with_unicode_line_breaks_stays_one_sse_line_per_event(engine: LLMEngine):
    # httpx's iter_lines (str.splitlines) cut such a data: line in two, and the client's json.loads failed (CI)
    serving = Breaking(engine, MODEL, EngineMetrics(MODEL))

    async def run():
        return [e async for e in await serving.create(_body(stream=True, ignore_eos=True), "lb")]

    events = asyncio.run(run())
    contents = []
    for raw in events:
        assert raw.endswith("\n\n") and raw.splitlines() == [raw[:-2], ""], repr(raw)
        if raw.startswith("data: {"):
            delta = json.loads(raw[6:])["choices"]
            contents += [c["delta"].get("content") or "" for c in delta]
    pieces = [c for c in contents if c]  # the role chunk's content is empty
    assert pieces and all(c.endswith("\u0085\u2028\u2029") for c in pieces)  # each piece kept its breaks


def test_usage_reports_the_prompt_tokens_the_prefix_cache_supplied(engine: LLMEngine):
    """``usage.prompt_tokens_details.cached_tokens`` (OpenAI's and vLLM's field; the openai SDK, LangChain's
    ``cache_read`` and LiteLLM read it): 0 for a new prompt, the cached full blocks when the same conversation
    comes again, in collected answers and in the streamed usage chunk alike."""
    from openai.types import CompletionUsage

    chat = OpenAIServingChat(engine, MODEL, EngineMetrics(MODEL))
    history = [{"role": "system", "content": "You answer in one short line. " * 2},
               {"role": "user", "content": "Name three prime numbers below twenty, please."}]
    body = {"model": MODEL, "messages": history, "max_tokens": 2, "temperature": 0}

    async def run():
        first = await chat.create(body, "u1")
        again = await chat.create(body, "u2")
        chunks = await _collect_stream(await chat.create({**body, "stream": True,
                                                          "stream_options": {"include_usage": True}}, "u3"))
        return first, again, chunks

    first, again, chunks = asyncio.run(run())
    n = first.usage.prompt_tokens
    block = engine.kv.block_size
    assert n > 2 * block and first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (n - 1) // block * block and cached > 0  # every full block but the one holding the last token
    streamed = CompletionUsage.model_validate(chunks[-1]["usage"])  # what the openai SDK makes of the chunk
    assert streamed.prompt_tokens == n and streamed.prompt_tokens_details.cached_tokens == cached
