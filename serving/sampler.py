"""Sampling: one next token per sequence from a batch of logits, with OpenAI's and vLLM's sampling options.

A sequence passed to ``sample`` needs ``params`` (``SamplingParams``), ``prompt_ids`` and ``output_ids`` (its
prompt and the tokens generated so far), ``counts`` (a per-vocabulary count tensor or None, kept by the caller
for penalties) and ``generator`` (a seeded CPU ``torch.Generator`` or None, created here on first use).

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
    # In-process callers that want token ids only (PPO/GRPO rollouts, training.rollout): ``detokenize=False``
    # skips the text (vLLM's name) unless ``stop`` strings need it; ``final_only`` sends one output at the end
    # instead of one per token (vLLM's RequestOutputKind.FINAL_ONLY). Both cut per-token host work from the
    # engine's step; at 16 rows that was two tokenizer decodes and a callback per row per step.
    detokenize: bool = True
    final_only: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def apply_logits_processors(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
    """Each sequence's ``params.logits_processors`` on its row; out of place (never writes into the runner's
    output, a CUDA graph's static buffer).

    Grammar processors (``batched = True``, ``serving.structured``) each fill their row of one CPU bitmask
    (rows without one stay all-allowed) and the mask is applied to the whole batch in one vectorized pass on the
    logits' device: no row waits on another's grammar (filling a row took 0.04 ms at vocab 49k on the 2-core
    CPU). One grammar per sequence: a second one's row would overwrite the first's."""
    rows = [i for i, s in enumerate(seqs) if s.params.logits_processors]
    if not rows:
        return logits
    grammar_rows: list[tuple[int, Any]] = []
    cloned = False
    for i in rows:
        for proc in seqs[i].params.logits_processors:
            if getattr(proc, "batched", False):
                grammar_rows.append((i, proc))
                continue
            if not cloned:
                logits, cloned = logits.clone(), True
            logits[i] = proc(seqs[i].output_ids, logits[i])
    if grammar_rows:
        from serving.structured import apply_token_bitmask, new_bitmask

        mask = new_bitmask(logits.shape[0], logits.shape[-1])
        for i, proc in grammar_rows:
            proc.fill_bitmask(seqs[i].output_ids, mask, i)
        logits = apply_token_bitmask(logits, mask)
    return logits


def _seen_mask(s: Any, vocab: int, device: torch.device) -> torch.Tensor:
    ids = list(getattr(s, "prompt_ids", None) or []) + list(s.output_ids)
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if ids:
        mask[torch.tensor(ids, device=device)] = True
    return mask


def process_logits(logits: torch.Tensor, seqs: list[Any]) -> torch.Tensor:
    """Logits after the per-sequence processors, penalties and min_tokens masks (a copy when any applies)."""
    raw = logits.float()
    logits = apply_logits_processors(raw, seqs)
    params = [s.params for s in seqs]
    if not any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               or (p.min_tokens and p.all_stop_token_ids) for p in params):
        return logits
    if logits is raw:
        logits = logits.clone()
    vocab, dev = logits.shape[-1], logits.device
    for i, s in enumerate(seqs):
        p = s.params
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
        # a grammar decides where its output ends (end-of-sequence is then the only token it allows)
        grammar = any(getattr(proc, "batched", False) for proc in p.logits_processors)
        if p.min_tokens and len(s.output_ids) < p.min_tokens and p.all_stop_token_ids and not grammar:
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
        ks_list = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        # every row with a top_k: the largest k only (topk of 50 over a 49k vocabulary, not a full sort)
        width = max(ks_list)
        sp, si = probs.topk(width, dim=-1) if width < vocab else probs.sort(dim=-1, descending=True)
        ks = torch.tensor(ks_list, device=logits.device)
        sp = sp.masked_fill(torch.arange(width, device=logits.device)[None, :] >= ks[:, None], 0.0)
        if any(p.top_p < 1.0 for p in params):
            # top_p over what top_k kept (renormalized), keeping at least the most likely token
            cum = sp.cumsum(dim=-1) / sp.sum(dim=-1, keepdim=True)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
            sp = sp.masked_fill(cum - sp / sp.sum(dim=-1, keepdim=True) > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return probs


def _uniforms(seqs: list[Any]) -> torch.Tensor:
    """One uniform in [0, 1) per row on the host (-1 for greedy rows): a seeded row draws from its own CPU
    generator (created on first use), so its stream depends on nothing else in the batch; the others from torch's
    global generator."""
    out = []
    for s in seqs:
        p = s.params
        if p.temperature == 0:
            out.append(-1.0)
        elif p.seed is None:
            out.append(float(torch.rand(1, dtype=torch.float64)))
        else:
            if s.generator is None:
                s.generator = torch.Generator().manual_seed(p.seed)
            out.append(float(torch.rand(1, dtype=torch.float64, generator=s.generator)))
    return torch.tensor(out, dtype=torch.float64)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i's token by inverse CDF: the first index whose cumulative (unnormalized) probability exceeds
    ``u[i]`` times the row's total, which is always a token of positive probability. One batched pass on the
    device (cumsum in float64 so the last kept token of a 150k vocabulary keeps its share), instead of one
    ``torch.multinomial`` per seeded row: at 16 rows that was 32 kernel launches and index writes per step."""
    cdf = probs.double().cumsum(dim=-1)
    target = u.clamp(min=0.0)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, seqs: list[Any]) -> tuple[list[int], list[TokenLogprob] | None]:
    """The next token of every row with one device-to-host copy (the tokens; logprobs when asked for)."""
    logits = process_logits(logits, seqs)
    params = [s.params for s in seqs]
    need_lp = any(p.logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if need_lp else None
    greedy = logits.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        chosen = greedy
    else:
        u = _uniforms(seqs).to(logits.device, non_blocking=True)
        chosen = torch.where(u < 0, greedy, draw(sampling_probs(logits, params), u))
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
