"""Sampling: one next token per sequence from a batch of logits, with OpenAI's sampling options.

A sequence passed to ``sample`` needs ``params`` (``SamplingParams``), ``output_ids`` (tokens generated so far),
``counts`` (a per-vocabulary count tensor or None, kept by the caller for penalties) and ``generator`` (a
seeded ``torch.Generator`` or None, created here on first use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (the API does not expose it; PPO/GRPO rollouts use it)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def sample(logits: torch.Tensor, seqs: list[Any]) -> tuple[list[int], list[TokenLogprob] | None]:
    logits = logits.float()
    params = [s.params for s in seqs]
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        logits = logits.clone()
        for i, s in enumerate(seqs):
            p = s.params
            if (p.presence_penalty or p.frequency_penalty) and s.output_ids:
                if s.counts is None:
                    s.counts = torch.zeros(logits.shape[-1], device=logits.device)
                    s.counts.index_add_(0, torch.tensor(s.output_ids, device=logits.device),
                                        torch.ones(len(s.output_ids), device=logits.device))
                logits[i] -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0).float()
    need_lp = any(p.logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if need_lp else None
    temps = [p.temperature for p in params]
    greedy = logits.argmax(dim=-1)
    if all(t == 0 for t in temps):
        chosen = greedy
    else:
        t = torch.tensor([max(x, 1e-5) for x in temps], device=logits.device)[:, None]
        scaled = logits / t
        if any(p.top_k for p in params):  # keep each row's k largest (ties at the k-th kept, as torch.topk's cut)
            v = scaled.shape[-1]
            k = torch.tensor([min(p.top_k, v) if p.top_k else v for p in params], device=logits.device)
            kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            sp, si = probs.sort(dim=-1, descending=True)
            cum = sp.cumsum(dim=-1)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
            sp = sp.masked_fill(cum - sp > top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
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
