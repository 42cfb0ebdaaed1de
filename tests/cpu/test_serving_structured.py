"""Tool calling and structured outputs through the real Ray Serve app, a tiny RANDOM Llama and real clients.

A random model is the honest test: its unconstrained output is never JSON (checked below), so every valid
object here comes from constrained decoding. The clients are used as their docs show: the openai SDK's
``chat.completions.parse`` and forced ``tool_choice`` (plain and streamed), LangChain's ``ChatOpenAI`` with
``bind_tools`` and ``with_structured_output``, LiteLLM's ``completion(..., api_base=...)``. Strings in the
schemas are bounded (``max_length``): inside an unbounded string a random model picks the closing quote about
once in the ~400 tokens of the toy vocabulary, longer than ``max_tokens``; a real model closes its strings.
Run under ``flock /tmp/ray-tests.lock`` (two local Ray clusters at once fail on this machine).
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from conftest import make_tiny_llama
from pydantic import BaseModel, Field
from serve_app import running_app, wait_ready

try:  # openai >= 3 ships its HTTP client as httpx2 (same API as httpx)
    import httpx2 as httpx
except ImportError:
    import httpx

MODEL = "tiny-tools"
MAX_TOKENS = 300


class Weather(BaseModel):
    """Get the weather forecast for a city."""

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=14)
    unit: Literal["celsius", "fahrenheit"]


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    member: bool


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": Weather.__doc__,
                                                 "parameters": Weather.model_json_schema()}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}}, "required": ["tz"],
    "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("ray")
    # the fallback tool prompt is ~650 tokens in the toy 400-token vocabulary: room beyond the fixture's 512
    # positions (RoPE has no learned positions; the weights are random anyway)
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny-tools"))
    cfg_file = model / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "max_position_embeddings": 2048}))
    with running_app(model, [f"served_model_name={MODEL}", "engine.max_model_len=2048", "engine.max_num_seqs=4",
                             "deployment.health_check_period_s=2"], {}) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


MSGS = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


def test_unconstrained_output_is_not_json(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("seed", [0, 1])
def test_sdk_parse_pydantic(client, seed):
    r = client.chat.completions.parse(model=MODEL, messages=MSGS, response_format=Person, max_tokens=MAX_TOKENS,
                                      seed=seed)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, Person)
    assert Person.model_validate_json(msg.content) == msg.parsed


def test_json_object(client):
    # a random model in free JSON writes long keys (nothing bounds them): only a prefix is checked when cut
    r = client.chat.completions.create(model=MODEL, messages=MSGS, response_format={"type": "json_object"},
                                       max_tokens=60, temperature=0)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def _check_calls(calls, allowed: set[str]) -> None:
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_forced_named_tool(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER_TOOL, TIME_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=MAX_TOKENS, seed=3)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert len(ch.message.tool_calls) == 1
    _check_calls(ch.message.tool_calls, {"get_time"})


def test_required_tool_with_history(client):
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3, "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny"}'},
        {"role": "user", "content": "And what time is it there?"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL, TIME_TOOL],
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS,
                                       seed=5)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    _check_calls(ch.message.tool_calls, {"get_weather", "get_time"})


def test_streamed_tool_call_reassembles(client):
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER_TOOL],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=MAX_TOKENS, seed=7, stream=True)
    calls: dict[int, dict] = {}
    pieces, finish = 0, None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                if tc.id is not None:  # OpenAI's order: the first delta of a call has its id, type and name
                    assert tc.index not in calls and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                calls[tc.index]["arguments"] += tc.function.arguments or ""
                pieces += 1
    assert finish == "tool_calls" and list(calls) == [0] and pieces > 3  # arrived in pieces, not at the end
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["get_weather"])


def test_uncompilable_schema_is_400(base, client):
    bad = {"type": "object", "properties": {"x": {"type": "tensor"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "response_format" and "tensor" in err["message"]
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MSGS, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": bad}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "tensor" in r.json()["error"]["message"]


def test_langchain_bind_tools_and_structured_output(base):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key="unused", max_tokens=MAX_TOKENS, seed=11,
                        max_retries=0, timeout=300)
    msg = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Oslo for a week?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "Weather"
    assert msg.tool_calls[0]["id"].startswith("call_")
    Weather.model_validate(msg.tool_calls[0]["args"])
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


def test_litellm_structured_and_forced_tool(base):
    litellm = pytest.importorskip("litellm")
    kw = {"model": f"openai/{MODEL}", "api_base": base + "/v1", "api_key": "unused", "max_tokens": MAX_TOKENS,
          "seed": 13, "timeout": 300, "num_retries": 0}
    r = litellm.completion(messages=MSGS, response_format=Person, **kw)
    Person.model_validate_json(r.choices[0].message.content)
    r = litellm.completion(messages=MSGS, tools=[WEATHER_TOOL], tool_choice="required", **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message.tool_calls, {"get_weather"})
