"""Sampling: one next token per sequence from a batch of logits, with OpenAI's and vLLM's sampling options.

A sequence passed to ``sample`` needs ``params`` (``SamplingParams``), ``prompt_ids`` and ``output_ids`` (its
prompt and the tokens generated so far), ``counts`` (a per-vocabulary count tensor or None, kept by the caller
for penalties) and ``generator`` (a seeded ``torch.Generator`` or None, created here on first use).

Order, as vLLM applies them: per-sequence logits processors -> repetition, frequency and presence penalties ->
min_tokens (end-of-sequence and stop ids masked) -> [greedy: argmax] -> temperature -> min_p -> top_k -> top_p ->
draw. Logprobs are those of the logits after the penalties and masks, before temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# A per-sequence logits processor (vLLM's per-request form): called once per decode step with the ids this
# sequence generated so far and its row of logits (float32, shape [vocab]); returns the row to sample from
# (e.g. with -inf where a grammar forbids a token). It may keep state (a grammar matcher advancing over the
# new ids); one instance serves one sequence.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # what min_tokens masks: stop_token_ids plus the model's end-of-sequence ids (the server fills it in, as
    # vLLM's _all_stop_token_ids; the engine knows the EOS ids, the request does not)
    all_stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _seen_mask(s: Any, vocab: int, device: torch.device) -> torch.Tensor:
    ids = list(getattr(s, "prompt_ids", None) or []) + list(s.output_ids)
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if ids:
        mask[torch.tensor(ids, device=device)] = True
    return mask


def process_logits(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
    """Logits after the per-sequence processors, penalties and min_tokens masks (a copy when any applies)."""
    logits = logits.float()
    params = [s.params for s in seqs]
    if not any(p.logits_processors or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               or (p.min_tokens and p.all_stop_token_ids) for p in params):
        return logits
    logits = logits.clone()
    vocab, dev = logits.shape[-1], logits.device
    for i, s in enumerate(seqs):
        p = s.params
        for proc in p.logits_processors:
            logits[i] = proc(list(s.output_ids), logits[i])
        if p.repetition_penalty != 1.0:
            seen = _seen_mask(s, vocab, dev)
            row = logits[i]
            logits[i] = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty,
                                                      row * p.repetition_penalty), row)
        if (p.presence_penalty or p.frequency_penalty) and s.output_ids:
            if s.counts is None:
                s.counts = torch.zeros(vocab, device=dev)
                ids = torch.tensor(s.output_ids, device=dev)
                s.counts.index_add_(0, ids, torch.ones(len(ids), device=dev))
            logits[i] -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0).float()
        if p.min_tokens and len(s.output_ids) < p.min_tokens and p.all_stop_token_ids:
            logits[i, torch.tensor(p.all_stop_token_ids, device=dev)] = float("-inf")
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Unnormalized probabilities to draw from: temperature, then min_p, top_k and top_p filters per row."""
    t = torch.tensor([max(p.temperature, 1e-5) for p in params], device=logits.device)[:, None]
    probs = torch.softmax(logits / t, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params) or any(p.top_p < 1.0 for p in params):
        sp, si = probs.sort(dim=-1, descending=True)
        ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
        sp = sp.masked_fill(torch.arange(vocab, device=logits.device)[None, :] >= ks[:, None], 0.0)
        if any(p.top_p < 1.0 for p in params):
            # top_p over what top_k kept (renormalized), keeping at least the most likely token
            cum = sp.cumsum(dim=-1) / sp.sum(dim=-1, keepdim=True)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
            sp = sp.masked_fill(cum - sp / sp.sum(dim=-1, keepdim=True) > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return probs


def sample(logits: torch.Tensor, seqs: list[Any]) -> tuple[list[int], list[TokenLogprob] | None]:
    logits = process_logits(logits, seqs)
    params = [s.params for s in seqs]
    need_lp = any(p.logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if need_lp else None
    greedy = logits.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        chosen = greedy
    else:
        probs = sampling_probs(logits, params)
        chosen = greedy.clone()
        unseeded = [i for i, p in enumerate(params) if p.temperature > 0 and p.seed is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=logits.device)
            chosen[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
        for i, s in enumerate(seqs):
            if s.params.temperature > 0 and s.params.seed is not None:
                if s.generator is None:
                    s.generator = torch.Generator(device=logits.device).manual_seed(s.params.seed)
                chosen[i] = torch.multinomial(probs[i], 1, generator=s.generator)[0]
    tokens = chosen.tolist()
    if logprobs is None:
        return tokens, None
    out: list[TokenLogprob] = []
    kmax = max(p.top_logprobs for p in params)
    top_v, top_i = (logprobs.topk(kmax, dim=-1) if kmax else (None, None))
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    top_v = top_v.tolist() if top_v is not None else None
    top_i = top_i.tolist() if top_i is not None else None
    for i, p in enumerate(params):
        top = list(zip(top_i[i][:p.top_logprobs], top_v[i][:p.top_logprobs], strict=True)) if kmax else []
        out.append(TokenLogprob(tokens[i], chosen_lp[i], top))
    return tokens, out
