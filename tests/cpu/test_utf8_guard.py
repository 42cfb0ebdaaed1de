"""serving/utf8_guard.py: UTF-8's byte grammar against Python's own decoder, and the grammar processor refusing the
byte sequence a random walk once wrote inside a JSON string (ED B9 97, an encoded surrogate: xgrammar 0.2.9 let it
through and the client's schema validation refused the 12-character "10-character" name)."""

from __future__ import annotations

import codecs
import json
import random

import jsonschema
import pytest
import torch
from conftest import make_tokenizer

from serving.structured import GrammarCompiler
from serving.utf8_guard import BOUNDARY, Utf8Guard, feed


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _python_says(data: bytes) -> str:
    """'complete', 'prefix' (a character unfinished that some continuation completes) or 'invalid', by Python's
    decoder (its incremental decoder keeps e.g. ED BF pending although no continuation can complete it)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        dec.decode(data, final=False)
    except UnicodeDecodeError:
        return "invalid"
    if not dec.getstate()[0]:
        return "complete"
    completes = any(_decodes(data + bytes([b]) + b"\x80" * rest) for b in range(0x80, 0xC0) for rest in range(3))
    return "prefix" if completes else "invalid"


def _guard_says(data: bytes) -> str:
    s = feed(BOUNDARY, data)
    return "invalid" if s is None else "complete" if s == BOUNDARY else "prefix"


@pytest.mark.parametrize("data", [b"\xed\xa0\x80", b"\xed\xb9\x97", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80",
                                  b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xf5", b"\x80", b"\xc3\x28"])
def test_invalid_sequences_are_refused(data):
    assert _python_says(data) == "invalid" and _guard_says(data) == "invalid"


def test_agrees_with_pythons_decoder_on_random_and_real_text():
    rng = random.Random(0)
    lead = [0x41, 0x7F, 0x80, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xA0, 0x9F, 0x90, 0x8F]
    for _ in range(20000):  # bytes biased to the boundaries of every range in RFC 3629's table
        data = bytes(rng.choice(lead) if rng.random() < 0.7 else rng.randrange(256) for _ in range(rng.randint(1, 6)))
        assert _guard_says(data) == _python_says(data), data.hex()
    text = "naïve ɧ 〯 엣步尔 🙂 \U0010fffd \ud7ff".encode()
    for i in range(len(text) + 1):
        assert _guard_says(text[:i]) == _python_says(text[:i])


def test_mask_after_a_lead_byte_allows_only_its_continuations():
    vocab = [b"a", b"\xed", b"\xb9", b"\x97", b"\x97\x97a", b"\xb9\x97", b"<s>"]
    g = Utf8Guard(vocab, len(vocab), byteless_ids={6})
    allowed = lambda state: [i for i in range(len(vocab)) if (int(g.mask(state)[i // 32]) >> (i % 32)) & 1]  # noqa: E731
    assert allowed(BOUNDARY) == [0, 1, 6]
    after_ed = g.advance(BOUNDARY, 1)
    assert allowed(after_ed) == [3, 4, 6]  # 80..9F only: no B9 (it would encode a surrogate)
    assert g.advance(g.advance(after_ed, 3), 3) == BOUNDARY


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_grammar_processor_refuses_a_surrogate_inside_a_string(tok):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"],
              "additionalProperties": False}
    comp = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    ed, b9 = tok.convert_tokens_to_ids("í"), tok.convert_tokens_to_ids("¹")  # byte-level BPE's 0xED and 0xB9
    assert {ed, b9}.isdisjoint({tok.unk_token_id})
    ids = tok('{"name": "').input_ids  # xgrammar's separators: ", " and ": "
    ids = [i for i in ids if i not in tok.all_special_ids] + [ed]
    proc = comp.processor(comp.compile(schema, "response_format"))
    allowed = proc(ids, torch.zeros(len(tok)))
    assert not proc.broken and allowed[b9] == float("-inf")
    assert (allowed == 0).any()  # the continuations 80..9F stay allowed
    # the grammar's own mask alone: xgrammar lets the surrogate's second byte through
    plain = comp.processor(comp.compile(schema, "response_format"))
    plain.utf8 = None
    assert plain(ids, torch.zeros(len(tok)))[b9] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_random_walks_stay_valid_utf8_and_within_max_length(tok, seed):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"],
              "additionalProperties": False}
    comp = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    proc = comp.processor(comp.compile(schema, "response_format"))
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(200):
        t = int(torch.multinomial(proc(ids, torch.randn(len(tok), generator=g) * 3).softmax(-1), 1, generator=g))
        if t == tok.eos_token_id:
            break
        ids.append(t)
    data = b"".join(comp.utf8.vocab[i] for i in ids)
    jsonschema.validate(json.loads(data.decode("utf-8")), schema)  # strict decode: no U+FFFD hides a bad byte
