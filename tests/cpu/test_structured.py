"""serving/structured.py: grammars from JSON schemas, per-row masks, on the tiny tokenizer with random logits.

Random logits are the honest test: any valid output comes from the mask alone. Strings are bounded
(``maxLength``) where a walk must end: inside an unbounded string nearly every token is allowed, so a random
walk would stay there; ``QUOTE_BIAS`` stands in for a model that closes its strings where none is given.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import make_tokenizer

from serving.errors import InvalidRequestError
from serving.structured import GrammarCompiler, apply_token_bitmask, new_bitmask, tool_call_schema
from serving.tools import parse_tool_calls

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "days", "unit"], "additionalProperties": False}
QUOTE_BIAS = 4.0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, len(tok), [tok.eos_token_id])


def walk(tok, processor, seed: int, bias: torch.Tensor | None = None, limit: int = 300) -> tuple[str, bool]:
    """Greedy over random logits through ``processor``; (text, ended with EOS)."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(limit):
        logits = torch.randn(len(tok), generator=g) + (bias if bias is not None else 0)
        t = int(processor(ids, logits).argmax())
        if t == tok.eos_token_id:
            return tok.decode(ids), True
        ids.append(t)
    return tok.decode(ids), False


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates(tok, compiler, seed):
    text, ended = walk(tok, compiler.processor(compiler.compile(WEATHER, "response_format")), seed)
    assert ended, text
    jsonschema.validate(json.loads(text), WEATHER)


def test_unconstrained_walk_is_not_json(tok):
    text, _ = walk(tok, lambda ids, row: row, 0, limit=40)  # the same walk without the mask: not JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_json_object_is_an_object_and_ends(tok, compiler):
    quote = torch.tensor([QUOTE_BIAS if '"' in p else 0.0 for p in tok.convert_ids_to_tokens(list(range(len(tok))))])
    for seed in range(3):
        text, ended = walk(tok, compiler.processor(compiler.compile(None, "response_format")), seed, quote, 600)
        assert ended, text
        assert isinstance(json.loads(text), dict)
        assert "\n" not in text and "  " not in text.replace('"  ', "")  # no free whitespace between tokens


def test_eos_only_when_complete(tok, compiler):
    p = compiler.processor(compiler.compile(WEATHER, "response_format"))
    row = p([], torch.zeros(len(tok)))
    assert row[tok.eos_token_id] == float("-inf")  # nothing generated yet: end not allowed
    ids = tok('{"city": "Paris", "days": 3, "unit": "celsius"}', add_special_tokens=False)["input_ids"]
    row = p(ids, torch.zeros(len(tok)))
    assert p.done and torch.isfinite(row).nonzero().flatten().tolist() == [tok.eos_token_id]


def test_forced_tool_call_matches_function_schema(tok, compiler):
    tools = [{"name": "get_weather", "parameters": WEATHER}, {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}]
    names = {t["name"] for t in tools}
    for schema, seed in ((tool_call_schema(tools[:1], parallel=False), 0), (tool_call_schema(tools), 1),
                         (tool_call_schema(tools, parallel=False), 2)):
        text, ended = walk(tok, compiler.processor(compiler.compile(schema, "tools")), seed)
        assert ended, text
        content, calls = parse_tool_calls(text, names)
        assert content is None and calls
        for c in calls:
            assert c["id"].startswith("call_") and c["type"] == "function"
            params = next(t["parameters"] for t in tools if t["name"] == c["function"]["name"])
            jsonschema.validate(json.loads(c["function"]["arguments"]), params)


def test_batched_mask_leaves_other_rows_alone(tok, compiler):
    grammar = compiler.compile(WEATHER, "response_format")
    a, b = compiler.processor(grammar), compiler.processor(grammar)
    b.advance(tok('{"city": "', add_special_tokens=False)["input_ids"])
    logits = torch.randn(3, len(tok))
    mask = new_bitmask(3, len(tok))
    a.fill_bitmask([], mask, 0)
    b.fill_bitmask(b_ids := tok('{"city": "', add_special_tokens=False)["input_ids"], mask, 2)
    out = apply_token_bitmask(logits, mask)
    assert torch.equal(out[1], logits[1])  # row 1 has no grammar: untouched
    assert torch.equal(out[0], a([], logits[0].clone()))  # same as the per-row path
    assert torch.equal(out[2], b(b_ids, logits[2].clone()))
    allowed0 = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert allowed0 and all(tok.decode([t]).startswith("{") for t in allowed0)
    assert torch.isfinite(out[2]).sum() > torch.isfinite(out[0]).sum()  # inside a string: much more allowed


def test_compile_cache_and_errors(compiler):
    assert compiler.compile(WEATHER, "response_format") is compiler.compile(json.loads(json.dumps(WEATHER)), "x")
    with pytest.raises(InvalidRequestError) as e:
        compiler.compile({"type": "object", "properties": {"a": {"type": "tensor"}}}, "response_format")
    assert e.value.param == "response_format" and e.value.status == 400 and "tensor" in e.value.message
    assert "json_schema_converter" not in e.value.message  # the library's log prefix is stripped
    with pytest.raises(InvalidRequestError) as e:
        compiler.compile({"$ref": "https://example.com/schema.json"}, "tools")
    assert e.value.param == "tools" and "example.com" in e.value.message
