"""serving/tools.py: tool prompts through real chat templates, parsing calls back, streaming them as OpenAI does."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer

from serving.tools import (
    FALLBACK_PROMPT,
    ToolCallStreamParser,
    parse_tool_calls,
    render_messages,
    template_supports_tools,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
NAMES = {"get_weather", "get_time"}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
# A template with tool support in the Hugging Face convention (as Qwen2.5's and Hermes' templates do it)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_fallback_prompt_for_a_template_without_tools(tok):
    assert not template_supports_tools(tok.chat_template)  # the tiny model's ChatML (SmolLM2's has none either)
    msgs, kwargs = render_messages(HISTORY, TOOLS, tok.chat_template, forced="get_weather")
    assert kwargs == {}
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools") and json.dumps(TOOLS[0]) in text
    assert "You must call the function get_weather now." in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_system_message_keeps_its_text_and_no_tools_no_prompt(tok):
    msgs, _ = render_messages([{"role": "system", "content": "Be brief."}, *HISTORY[:1]], TOOLS, None)
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and len(msgs) == 2
    msgs, _ = render_messages(HISTORY, None, None)  # tool_choice none: history still renders, no tool prompt
    assert all(FALLBACK_PROMPT[:7] not in m["content"] for m in msgs) and msgs[-1]["role"] == "user"


def test_template_with_tool_support_gets_tools(tok):
    assert template_supports_tools(TOOL_TEMPLATE)
    msgs, kwargs = render_messages(HISTORY, TOOLS, TOOL_TEMPLATE)
    assert kwargs == {"tools": TOOLS}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # an object, as HF templates expect
    assert HISTORY[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the request is not changed
    text = tok.apply_chat_template(msgs, chat_template=TOOL_TEMPLATE, add_generation_prompt=True, tokenize=False,
                                   **kwargs)
    assert 'TOOLS:{"type": "function"' in text and 'CALL get_weather {"city": "Paris"}' in text
    assert "<|im_start|>tool\nsunny, 21 C" in text


def test_parse_bare_json_and_tags():
    content, calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', NAMES)
    assert content is None and len(calls) == 1
    c = calls[0]
    assert c["id"].startswith("call_") and len(c["id"]) == 29 and c["type"] == "function"
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    _, calls = parse_tool_calls('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": '
                                '{"city": "Rome"}}]', NAMES)
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    content, calls = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                      '"Nice"}}\n</tool_call>', NAMES)
    assert content == "Let me check." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Nice"}


def test_parse_leaves_non_calls_as_content():
    for text in ('{"name": "rm_rf", "arguments": {}}', '{"answer": 42}', "<tool_call>{not json</tool_call>",
                 "plain words"):
        assert parse_tool_calls(text, NAMES) == (text, [])


def _stream(text: str, forced: bool, step: int = 1) -> list[dict]:
    p = ToolCallStreamParser(NAMES, forced)
    out = []
    for i in range(0, len(text), step):
        out += p.feed(text[i:i + step])
    return out + p.finish()


def _reassemble(deltas: list[dict]) -> tuple[str, dict[int, dict]]:
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["index"] not in calls and c["type"] == "function" and c["function"]["name"]
                calls[c["index"]] = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            else:
                calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_stream_forced_array_in_openai_order(step):
    text = ('[{"name": "get_weather", "arguments": {"city": "A \\"}{\\" B", "n": [1, {"x": 2}]}}, '
            '{"name": "get_time", "arguments": {}}]')
    deltas = _stream(text, forced=True, step=step)
    first = deltas[0]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""} and first["id"].startswith("call_")
    content, calls = _reassemble(deltas)
    assert content == "" and [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": 'A "}{" B', "n": [1, {"x": 2}]}
    assert json.loads(calls[1]["arguments"]) == {}
    if step == 1:  # arguments arrive as they are generated, not at the end
        assert sum(1 for d in deltas if "tool_calls" in d and "id" not in d["tool_calls"][0]) > 10


def test_stream_auto_content_then_tagged_call():
    text = 'Checking <tool_c the sky.\n<tool_call>\n{"arguments": {"city": "Bern"}, "name": "get_weather"}\n' \
           '</tool_call>'
    content, calls = _reassemble(_stream(text, forced=False))
    assert content == "Checking <tool_c the sky.\n"  # a partial tag was held back, then released as text
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Bern"}
    assert _reassemble(_stream("no calls at all <tool", forced=False)) == ("no calls at all <tool", {})
