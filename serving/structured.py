"""Structured outputs: compiled grammars (xgrammar) and the per-sequence matchers that mask each row's logits.

Why xgrammar (``python -m serving.bench_structured``, the 2-core CPU machine, SmolLM2's 49,152-token vocabulary,
a 7-field nested schema): filling the next-token mask took 0.04 ms a step at batch 1 and 0.10 ms for 8 rows
(llguidance 1.9.1: 0.11 ms and 9.6 ms), and its tokenizer set-up 0.3 s (llguidance 3.0 s). llguidance compiles a
schema faster (5.5 ms vs 15 ms), but compiling happens once per schema (cached here), masks every step.

- ``GrammarCompiler`` (one per engine: tokenizer + the model's logits width + its end-of-sequence ids) turns a
  JSON schema into a compiled grammar, with a cache keyed by the schema's canonical text. A schema xgrammar
  cannot compile raises ``InvalidRequestError`` naming the request field it came from (``param``).
- ``GrammarLogitsProcessor`` is one sequence's matcher, a ``SamplingParams`` logits processor: it advances over
  the tokens generated since its last call and masks the row. The sampler's batched path calls
  ``fill_bitmask`` for each constrained row, then ``apply_token_bitmask`` once for the whole batch, so rows
  without a grammar are untouched and no row waits for another.
- Output always ends: whitespace between JSON tokens is not allowed (xgrammar's ``any_whitespace=False``,
  which a random model would otherwise fill forever), properties the schema does not name are never generated,
  and end-of-sequence is allowed only once the grammar is complete (then only it is). Special tokens and
  tokens holding raw control characters are masked everywhere (``_without_control_chars``).
- ``GrammarCompiler`` set-up (xgrammar's tokenizer info plus that ban) took 2.3 s for SmolLM2's 49k tokens on
  the loaded CPU machine: the chat serving builds it on the first structured request.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from serving.errors import InvalidRequestError
from serving.utf8_guard import BOUNDARY, Utf8Guard, pack_bits

logger = logging.getLogger("serving.structured")
# compiled grammars kept: bench_structured's 7-field schema at SmolLM2's vocab 49k took 15 ms to compile and
# holds 77 KB (CompiledGrammar.memory_size_bytes), so 256 of them are ~20 MB
CACHE_SIZE = 256
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] [^ ]+:\d+: (Check failed: \(.*?\) is false: )?")


def canonical(schema: Any) -> str:
    """The cache key and the text compiled: keys keep their order (xgrammar generates properties in it)."""
    return json.dumps(schema, separators=(",", ":"))


def tool_call_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """What a forced tool call must generate: ``{"name": N, "arguments": {...}}`` for one of ``tools``.

    ``tools`` are OpenAI function definitions (``{"name", "parameters"?}``); one tool gives one object (a named
    ``tool_choice``), several give an array of one or more (``"required"``; exactly one unless ``parallel``).
    ``serving.tools.parse_tool_calls`` reads both forms back."""
    calls = []
    for f in tools:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        calls.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if len(tools) == 1 and not parallel:
        return one
    return {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def _remote_ref(schema: Any) -> str | None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return ref
        return next((r for v in schema.values() if (r := _remote_ref(v))), None)
    if isinstance(schema, list):
        return next((r for v in schema if (r := _remote_ref(v))), None)
    return None


class GrammarCompiler:
    """Compiles JSON schemas for one tokenizer; thread-safe; keeps the last ``CACHE_SIZE`` grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self.allowed_words = _without_control_chars(tokenizer, vocab_size, stop_token_ids)
        self.utf8 = Utf8Guard.from_tokenizer_info(info, vocab_size, tokenizer, stop_token_ids)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, schema: dict[str, Any] | None, param: str) -> Any:
        """The grammar for ``schema`` (None: any JSON object, OpenAI's ``json_object``); errors name ``param``."""
        key = "json_object" if schema is None else canonical(schema)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequestError(f"{param}: the JSON schema must be an object", param=param)
        if (ref := _remote_ref(schema)) is not None:
            raise InvalidRequestError(f"{param}: the JSON schema cannot be compiled: only local '$ref's "
                                      f"('#/...') are supported, got {ref!r}", param=param)
        try:
            if schema is None:
                grammar = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                             strict_mode=False)
            else:
                grammar = self._compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar raises RuntimeError from C++ for bad schemas
            reason = _LOG_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
            raise InvalidRequestError(f"{param}: the JSON schema cannot be compiled: {reason}", param=param) from None
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def processor(self, grammar: Any) -> GrammarLogitsProcessor:
        return GrammarLogitsProcessor(self._xgr.GrammarMatcher(grammar), self.vocab_size, self.allowed_words,
                                      self.utf8)


class GrammarLogitsProcessor:
    """One sequence's grammar state as a logits processor (``(output_ids, row) -> row``, see serving/sampler.py).

    Called once per step with every token the sequence has generated so far; the ones not seen yet are fed to
    the matcher first. ``fill_bitmask`` + ``apply_token_bitmask`` is the same work for many rows at once."""

    batched = True  # the sampler may use fill_bitmask / apply_token_bitmask instead of calling it per row

    def __init__(self, matcher: Any, vocab_size: int, allowed_words: torch.Tensor | None = None,
                 utf8: Utf8Guard | None = None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.allowed_words = allowed_words
        self.utf8 = utf8
        self.utf8_state = BOUNDARY
        self.seen = 0
        self.broken = False

    def advance(self, output_ids: list[int]) -> None:
        for t in output_ids[self.seen:]:
            if not self.broken and not self.matcher.accept_token(t):
                # only if something past the mask chose the token (e.g. an end-of-sequence the engine ignored
                # under ignore_eos): stop constraining rather than fail the engine's step for every row
                logger.warning("grammar rejected token %d after %d tokens; unconstrained from here", t, self.seen)
                self.broken = True
            if self.utf8 is not None:
                self.utf8_state = self.utf8.advance(self.utf8_state, t)
        self.seen = len(output_ids)

    @property
    def done(self) -> bool:
        """The grammar has matched a complete value (for an object or array: nothing may follow but the end)."""
        return self.matcher.is_completed()

    def fill_bitmask(self, output_ids: list[int], bitmask: torch.Tensor, row: int) -> None:
        self.advance(output_ids)
        if self.broken:
            return  # the row stays all-allowed
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.allowed_words is not None:
            bitmask[row] &= self.allowed_words
        if self.utf8 is not None:
            valid = bitmask[row] & self.utf8.mask(self.utf8_state)
            if bool(valid.any()):  # never leave a row with nothing allowed: the grammar's own mask then stands
                bitmask[row] = valid

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        bitmask = new_bitmask(1, self.vocab_size)
        self.fill_bitmask(output_ids, bitmask, 0)
        return apply_token_bitmask(logits[None], bitmask)[0]


def _without_control_chars(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> torch.Tensor:
    """One bitmask row allowing every token but special ones and those with a control character (U+0000-U+001F).

    JSON strings may not contain them raw (RFC 8259), yet xgrammar 0.2.9's string rule lets all but CR/LF
    through: 1 of 4 random walks over the tiny test vocabulary wrote one (a 0x1e byte token) and ``json.loads``
    refused the result. Between JSON tokens no whitespace is generated, so no such token is ever needed."""
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
    banned = [i for i, t in enumerate(texts) if i not in stop_token_ids and any(ord(c) < 0x20 for c in t)]
    # special tokens (<pad>, <|im_start|>) would sit in a string as text the detokenizer then drops
    banned += [i for i in tokenizer.all_special_ids if i not in stop_token_ids and i < vocab_size]
    banned += range(len(texts), vocab_size)  # logits past the tokenizer's vocabulary (padding rows)
    allowed = torch.ones((vocab_size + 31) // 32 * 32, dtype=torch.bool)
    allowed[torch.tensor(banned, dtype=torch.long)] = False
    return pack_bits(allowed)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 (rows, ceil(vocab/32)) CPU tensor, all tokens allowed (the layout xgrammar fills)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


@functools.cache
def _bit_values(device: torch.device) -> torch.Tensor:
    """int32 [1, 2, 4, ..., -2**31]: bit i of a mask word (a constant per device, built once)."""
    return torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` (rows, vocab) with -inf where ``bitmask`` (rows, ceil(vocab/32) int32, bit i of word w allows
    token 32*w+i) forbids; out of place, vectorized on the logits' device (a copy and three element-wise
    kernels on a GPU)."""
    bits = bitmask.to(logits.device, non_blocking=True)
    forbidden = (bits.unsqueeze(-1) & _bit_values(logits.device)).view(bits.shape[0], -1)[:, :logits.shape[-1]] == 0
    return logits.masked_fill(forbidden, float("-inf"))
