"""Sampling: one next token per sequence from a batch of logits, with OpenAI's and vLLM's sampling options.

A sequence passed to ``sample`` needs ``params`` (``SamplingParams``), ``prompt_ids`` and ``output_ids`` (its
prompt and the tokens generated so far), ``counts`` (a per-vocabulary count tensor or None, kept by the caller
for penalties) and ``generator`` (a seeded row's ``SeededUniforms`` or None, created here on first use).

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


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the GPU: on CUDA through pinned memory and an
    asynchronous copy (the caching host allocator keeps the pinned block until the copy ran). A plain ``.to()``
    (or ``torch.tensor(..., device=cuda)``) synchronizes the stream: in the sampler that waited for the whole
    decode graph before the sampling kernels could even be launched."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class SamplePlan:
    """What a batch's params ask of the sampler, read once per batch composition instead of once per step: the
    engine keeps one while its decode batch holds the same sequences (``serving.decode_inputs``), so a step makes
    no per-row ``any()`` scans and no host-to-device copy of per-row settings (temperature, top_p, ...): those
    tensors are built on the first step that needs them and reused."""

    __slots__ = ("params", "process", "need_lp", "kmax", "all_greedy", "any_greedy", "temps", "min_p", "ks",
                 "top_p", "width", "_dev")

    def __init__(self, params: list[SamplingParams], vocab: int | None = None):
        self.params = params
        self.process = any(p.logits_processors or p.presence_penalty or p.frequency_penalty
                           or p.repetition_penalty != 1.0 or (p.min_tokens and p.all_stop_token_ids)
                           for p in params)
        self.need_lp = any(p.logprobs for p in params)
        self.kmax = max((p.top_logprobs for p in params), default=0)
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.any_greedy = any(p.temperature == 0 for p in params)
        temps = [max(p.temperature, 1e-5) for p in params]
        # x / 1.0 is x exactly: a batch at temperature 1 (the rollouts') skips the division and its copy
        self.temps = None if all(t == 1.0 for t in temps) else temps
        self.min_p = [p.min_p for p in params] if any(p.min_p > 0 for p in params) else None
        self.top_p = [p.top_p for p in params] if any(p.top_p < 1.0 for p in params) else None
        self.ks: list[int] | None = None
        self.width = 0
        self._dev: dict[tuple[str, str], torch.Tensor] = {}
        if vocab is not None:
            self._filters(vocab)

    def _filters(self, vocab: int) -> None:
        if self.width and self.width <= vocab:
            return
        filt = any(0 < p.top_k < vocab for p in self.params) or self.top_p is not None
        self.ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in self.params] if filt else None
        self.width = max(self.ks) if self.ks else vocab

    def tensor(self, name: str, device: torch.device) -> torch.Tensor:
        """The named per-row list as a [rows, 1] tensor on ``device`` (top_k as [rows]), built once."""
        key = (name, str(device))
        t = self._dev.get(key)
        if t is None:
            t = to_device(torch.tensor(getattr(self, name)), device)
            self._dev[key] = t = t if name == "ks" else t[:, None]
        return t


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams], plan: SamplePlan | None = None
                   ) -> torch.Tensor:
    """Unnormalized probabilities to draw from: temperature, then min_p, top_k and top_p filters per row."""
    plan = plan if plan is not None else SamplePlan(params)
    vocab, dev = logits.shape[-1], logits.device
    plan._filters(vocab)
    probs = torch.softmax(logits / plan.tensor("temps", dev) if plan.temps is not None else logits, dim=-1)
    if plan.min_p is not None:
        probs = probs.masked_fill(probs < plan.tensor("min_p", dev) * probs.max(dim=-1, keepdim=True).values, 0.0)
    if plan.ks is not None:
        # every row with a top_k: the largest k only (topk of 50 over a 49k vocabulary, not a full sort)
        width = plan.width
        sp, si = probs.topk(width, dim=-1) if width < vocab else probs.sort(dim=-1, descending=True)
        sp = sp.masked_fill(torch.arange(width, device=dev)[None, :] >= plan.tensor("ks", dev)[:, None], 0.0)
        if plan.top_p is not None:
            # top_p over what top_k kept (renormalized), keeping at least the most likely token
            cum = sp.cumsum(dim=-1) / sp.sum(dim=-1, keepdim=True)
            sp = sp.masked_fill(cum - sp / sp.sum(dim=-1, keepdim=True) > plan.tensor("top_p", dev), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return probs


# uniforms a seeded row draws from its generator at once: one torch.rand(64) costs about what one torch.rand(1)
# does (~2 us on the 2-core CPU), and a row needed one call per token (16 calls a step at 16 rows)
UNIFORM_BLOCK = 64


class SeededUniforms:
    """A seeded row's stream of uniforms from its own CPU generator, drawn ``UNIFORM_BLOCK`` at a time. The same
    values, in the same order, as one ``torch.rand(1, float64)`` per token (CPU ``uniform_`` fills a tensor
    serially, so ``rand(k)`` is k single draws: tests/cpu/test_sampler.py checks it); nothing else draws from the
    generator, so drawing ahead changes no value."""

    __slots__ = ("gen", "buf", "i")

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.buf: list[float] = []
        self.i = 0

    def next(self) -> float:
        if self.i == len(self.buf):
            self.buf = torch.rand(UNIFORM_BLOCK, dtype=torch.float64, generator=self.gen).tolist()
            self.i = 0
        self.i += 1
        return self.buf[self.i - 1]


def _uniforms(seqs: list[Any]) -> torch.Tensor:
    """One uniform in [0, 1) per row on the host (-1 for greedy rows): a seeded row draws from its own stream
    (``SeededUniforms``, created on first use), so its draws depend on nothing else in the batch; the others take
    one each, in row order, from torch's global generator (one call for all of them)."""
    out, free = [], []
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature == 0:
            out.append(-1.0)
        elif p.seed is None:
            out.append(0.0)
            free.append(i)
        else:
            if s.generator is None:
                s.generator = SeededUniforms(p.seed)
            out.append(s.generator.next())
    if free:
        for i, u in zip(free, torch.rand(len(free), dtype=torch.float64).tolist(), strict=True):
            out[i] = u
    return torch.tensor(out, dtype=torch.float64)


def draw(probs: torch.Tensor, u: torch.Tensor, greedy_rows: bool = True) -> torch.Tensor:
    """Row i's token by inverse CDF: the first index whose cumulative (unnormalized) probability exceeds
    ``u[i]`` times the row's total, which is always a token of positive probability. One batched pass on the
    device (cumsum in float64 so the last kept token of a 150k vocabulary keeps its share), instead of one
    ``torch.multinomial`` per seeded row: at 16 rows that was 32 kernel launches and index writes per step.
    ``greedy_rows=False`` promises no u < 0 (the clamp is then skipped: it would change nothing)."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.clamp(min=0.0) if greedy_rows else u)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, seqs: list[Any], plan: SamplePlan | None = None,
           before_wait: Callable[[torch.Tensor], None] | None = None,
           ) -> tuple[list[int], list[TokenLogprob] | None]:
    """The next token of every row with one device-to-host copy (the tokens; logprobs when asked for). ``plan``:
    the batch's ``SamplePlan`` when the caller keeps one (built here otherwise). ``before_wait(chosen)``: called
    with the chosen tokens on the device once every kernel that reads ``logits`` is queued and their copy to the
    host has started, before the host waits for it (the engine queues the next decode step there; on CUDA the
    wait is on an event after the copy, so it does not wait for that step). Not with logprobs (their copies would
    queue behind it)."""
    if before_wait is not None and plan is not None and plan.need_lp:
        raise ValueError("before_wait cannot be used with logprobs")
    plan = plan if plan is not None else SamplePlan([s.params for s in seqs])
    logits = process_logits(logits, seqs) if plan.process else logits.float()
    params = plan.params
    logprobs = torch.log_softmax(logits, dim=-1) if plan.need_lp else None
    if plan.all_greedy:
        chosen = logits.argmax(dim=-1)
    else:
        u = to_device(_uniforms(seqs), logits.device)
        drawn = draw(sampling_probs(logits, params, plan), u, greedy_rows=plan.any_greedy)
        # no greedy row: every u >= 0, so the argmax and the select would keep ``drawn`` as it is
        chosen = torch.where(u < 0, logits.argmax(dim=-1), drawn) if plan.any_greedy else drawn
    if before_wait is None:
        tokens = chosen.tolist()
    elif chosen.device.type == "cuda":
        host = chosen.to("cpu", non_blocking=True)  # into pinned memory, queued before what ``before_wait`` adds
        copied = torch.cuda.Event()
        # on the stream of the tokens' device: the engine's thread never set its current device (a torchrun
        # rank's GPU is not device 0)
        copied.record(torch.cuda.current_stream(chosen.device))
        before_wait(chosen)
        copied.synchronize()
        tokens = host.tolist()
    else:
        before_wait(chosen)
        tokens = chosen.tolist()
    if logprobs is None:
        return tokens, None
    out: list[TokenLogprob] = []
    kmax = plan.kmax
    top_v, top_i = (logprobs.topk(kmax, dim=-1) if kmax else (None, None))
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    top_v = top_v.tolist() if top_v is not None else None
    top_i = top_i.tolist() if top_i is not None else None
    for i, p in enumerate(params):
        top = list(zip(top_i[i][:p.top_logprobs], top_v[i][:p.top_logprobs], strict=True)) if kmax else []
        out.append(TokenLogprob(tokens[i], chosen_lp[i], top))
    return tokens, out
