"""Which sequences run in the next engine step: admission by free KV blocks, chunked prefill that starts after
the cached prefix, decode slots, and preemption when blocks run out mid-decode.

- Admission is first come, first served: the head of the queue is admitted when its prompt's blocks (minus the
  blocks the prefix cache already holds) are free *and* the blocks left over still cover the next
  ``admission_lookahead`` tokens of every running sequence and of itself (each bounded by what it may still
  produce); nothing behind it jumps ahead. With nothing running the head is admitted on its prompt alone, so
  every request that fits the cache by itself is served (no starvation). See ``Scheduler.admit`` for why.
- A prefill runs in chunks of at most ``prefill_chunk`` tokens and ``max_prefill_tokens`` per step over all
  sequences, starting at the first uncached token.
- Before a decode step every decoding sequence whose next token opens a new block gets one. When the pool is
  empty a running sequence is preempted (``preemption_victim``: the one with the fewest computed tokens, or the
  most recently admitted): its blocks are freed (its full blocks stay in the prefix cache until evicted) and it
  goes back to the front of the queue to be recomputed (prompt + the tokens it already produced), then it
  continues where it stopped. Nobody fails for lack of blocks.

Plain Python over ``serving.kv_cache.KVCacheManager``; the engine runs the forwards.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from serving.kv_cache import KVCacheManager
from serving.sampler import SamplingParams, TokenLogprob


@dataclass
class RequestTimes:
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    """One request's state. ``compute_ids`` is what a prefill feeds (the prompt; after a preemption the prompt
    plus all produced tokens but the last), ``num_computed`` how many tokens have K/V in the cache."""

    __slots__ = ("id", "prompt_ids", "params", "sink", "output_ids", "text", "emitted", "prefix_offset",
                 "read_offset", "pending_ids", "pending_lp", "generator", "times", "finished", "finish_reason",
                 "counts", "stop_hold", "compute_ids", "num_computed", "prefilled", "sample_after_prefill",
                 "cached_tokens", "prompt_cached_tokens", "preemptions", "order")

    def __init__(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Any], None]):
        self.id = seq_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.output_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # chars of text already sent
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending_ids: list[int] = []
        self.pending_lp: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None
        self.times = RequestTimes(arrival=time.monotonic())
        self.finished = False
        self.finish_reason: str | None = None
        self.counts: torch.Tensor | None = None  # token counts for presence/frequency penalties
        self.stop_hold = max((len(s) for s in params.stop), default=1) - 1
        self.compute_ids = prompt_ids
        self.num_computed = 0
        self.prefilled = False
        self.sample_after_prefill = True
        self.cached_tokens = 0  # prompt tokens the prefix cache supplied at the latest admission
        self.prompt_cached_tokens = 0  # ... at the first one (usage.prompt_tokens_details.cached_tokens)
        self.preemptions = 0
        self.order = 0  # admission order (larger = more recent)

    @property
    def pos(self) -> int:
        """Tokens in the cache (the position the next token is written at)."""
        return self.num_computed

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class StatsListener:
    """Hooks the engine calls from its thread (``serving.metrics.EngineMetrics`` implements them)."""

    def on_admitted(self, seq: Sequence) -> None: ...
    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None: ...
    def on_preempted(self, seq: Sequence) -> None: ...
    def on_token(self, seq: Sequence, now: float) -> None: ...
    def on_finished(self, seq: Sequence) -> None: ...
    def on_step(self, running: int, waiting: int, kv_usage: float) -> None: ...


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int
    last: bool  # the chunk that completes the prefill


class Scheduler:
    """Admission, chunked prefill and decode batching over one ``KVCacheManager``.

    ``admission_lookahead`` (tokens) and ``preemption_victim`` are the anti-thrashing knobs
    (``EngineConfig.admission_lookahead_tokens`` / ``preemption_victim``); ``admission_lookahead=0`` with
    ``"newest"`` is the first paged engine's policy (admit on the prompt's blocks alone, preempt the newest)."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_prefill_tokens: int, prefill_chunk: int,
                 stats: StatsListener | None = None, admission_lookahead: int = 0,
                 preemption_victim: str = "newest", max_model_len: int | None = None):
        if preemption_victim not in ("newest", "least_computed"):
            raise ValueError(f"preemption_victim must be 'newest' or 'least_computed', got {preemption_victim!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.stats = stats or StatsListener()
        self.admission_lookahead = admission_lookahead
        self.preemption_victim = preemption_victim
        self.max_model_len = max_model_len or kv.capacity_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.num_preemptions = 0
        self.recomputed_tokens = 0  # tokens a preemption took out of the cache that were prefilled again
        self._lost: dict[str, int] = {}  # preempted sequence -> tokens it had in the cache
        self._order = itertools.count(1)

    # -- queue
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _growth_blocks(self, seq: Sequence, tokens: int, blocks: int) -> int:
        """Blocks ``seq`` (``tokens`` in the cache or about to be, ``blocks`` held) takes for its next
        ``admission_lookahead`` tokens, bounded by its max_tokens and the model's length."""
        left = seq.params.max_tokens - len(seq.output_ids)
        end = min(tokens + min(self.admission_lookahead, max(0, left)), self.max_model_len)
        return max(0, self.kv.blocks_for(end) - blocks)

    def _running_reserve(self) -> int:
        kv = self.kv
        return sum(self._growth_blocks(s, max(s.num_computed, len(s.compute_ids)), len(kv.tables[s.id].blocks))
                   for s in self.running)

    def admit(self) -> list[Sequence]:
        """Admit waiting sequences in order while their blocks are free; returns the ones admitted.

        Why a lookahead reserve: admitting on the prompt's blocks alone filled the cache with prompts whose
        replies then had no room; the running sequences grew into each other, preempted the newest and redid its
        prefill (H200, 4 GB profile, 48 blocks of 16, 48 instructionwild prompts at once: 32 preemptions).
        Keeping back the blocks the running sequences need for their next ``admission_lookahead`` tokens lets
        them finish. Chosen by counts from ``python -m serving.bench_scheduler`` (loadtest/results/cpu/), CPU:
        on the H200 load itself (the same prompts through the checkpoint's tokenizer, 4 sequences at most; the
        old policy's 32 preemptions come out exactly; the victim least_computed except for the old policy's
        newest) preemptions / recomputed tokens / engine steps were
        32 / 806 / 1,067 admitting on the prompt alone, 9 / 345 / 1,054 at 8 tokens, 5 / 238 / 1,098 at 16 and
        3 / 88 / 1,120 at 32; over 6 log-normal loads at 32 sequences 271 / 8,827 / 6,258, 76 / 3,162 / 6,230,
        51 / 1,660 / 6,348 and 16 / 511 / 6,680. A step is what a memory-bound GPU decode pays for (~30 ms on
        that H200 run: 111 tok/s at ~3.3 running), a recomputed token ~0.3 ms (37 ms per 128-token chunk there):
        8 tokens cuts the preemptions by 3.5x without a step more; 16 and up pay more steps (fewer sequences
        decode at once) than the recompute they save. With nothing running the reserve is waived: a request that
        fits the cache alone always starts, so none that fits is starved or failed; the reserve only orders who
        runs when."""
        admitted = []
        reserve = None
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            headroom = self.kv.headroom_after_admit(seq.compute_ids)
            if headroom < 0:
                break
            own = 0
            if self.admission_lookahead > 0 and self.running:
                if reserve is None:
                    reserve = self._running_reserve()
                n = len(seq.compute_ids)
                own = self._growth_blocks(seq, n, self.kv.blocks_for(n))
                if reserve + own > headroom:
                    break
            self.waiting.popleft()
            seq.cached_tokens = seq.num_computed = self.kv.admit(seq.id, seq.compute_ids)
            if not seq.preemptions:
                seq.prompt_cached_tokens = seq.cached_tokens
            lost = self._lost.pop(seq.id, 0)
            self.recomputed_tokens += max(0, min(lost, len(seq.compute_ids)) - seq.cached_tokens)
            seq.prefilled = False
            seq.order = next(self._order)
            self.running.append(seq)
            if reserve is not None:
                reserve += own
            self.stats.on_prefix_cache(len(seq.compute_ids), seq.cached_tokens)
            admitted.append(seq)
        return admitted

    def prefill_chunks(self) -> list[PrefillChunk]:
        """This step's prefill work: chunks of the admitted, not yet prefilled sequences within the token budget."""
        budget, out = self.max_prefill_tokens, []
        for seq in self.running:
            if seq.prefilled:
                continue
            start, total = seq.num_computed, len(seq.compute_ids)
            while budget > 0 and start < total:
                end = min(total, start + self.prefill_chunk, start + budget)
                out.append(PrefillChunk(seq, start, end, end == total))
                budget -= end - start
                start = end
            if budget <= 0:
                break
        return out

    def schedule_decode(self) -> list[Sequence]:
        """The decode batch: every prefilled sequence, each with a block for its next position. Preempts
        (``pick_victim``) while the pool is empty."""
        for seq in list(self.running):
            if not seq.prefilled or seq not in self.running:
                continue
            if not self.kv.append_slot_needed(seq.id, seq.num_computed):
                continue
            while self.kv.pool.num_free == 0:
                victim = self.pick_victim()
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.kv.grow(seq.id)
        return [s for s in self.running if s.prefilled]

    def pick_victim(self) -> Sequence:
        """The running sequence to preempt. ``newest``: the most recently admitted. ``least_computed``: the one
        with the fewest tokens in the cache (the least prefill to redo), newest first among equals.

        Why least_computed: the recompute a preemption costs is bounded by the smallest running sequence, never a
        long prompt admitted last (with ``newest`` a 900-token prompt is the victim every time it is readmitted),
        and the furthest sequence is only preempted when every running sequence has as many tokens, so one of the
        furthest always progresses and finishes: no request is preempted forever. Measured with the 8-token
        lookahead (the loads in ``admit``): 9 / 345 / 1,054 (preemptions / recomputed tokens / steps) against
        newest's 8 / 317 / 1,070 on the H200 load, 76 / 3,162 / 6,230 against 78 / 3,437 / 6,289 on the
        log-normal ones."""
        if self.preemption_victim == "newest":
            return self.running[-1]
        return min(reversed(self.running), key=lambda s: s.num_computed)

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and requeue it at the front for recompute."""
        self.kv.free(seq.id)
        self.running.remove(seq)
        self._lost[seq.id] = seq.num_computed
        seq.compute_ids = seq.prompt_ids + seq.output_ids[:-1] if seq.output_ids else seq.prompt_ids
        seq.sample_after_prefill = not seq.output_ids
        seq.num_computed = 0
        seq.prefilled = False
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.stats.on_preempted(seq)

    def after_tokens(self, seq: Sequence) -> None:
        """Register the blocks that became full (prefix cache) after ``seq.num_computed`` changed."""
        if self.kv.pool.prefix_caching and (not seq.prefilled or seq.num_computed % self.kv.block_size == 0):
            self.kv.commit_full_blocks(seq.id, seq.all_ids(), seq.num_computed)

    def remove(self, seq: Sequence) -> bool:
        """Drop a finished or aborted sequence wherever it is; frees its blocks. True when it was waiting."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.id)
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._lost.pop(seq.id, None)
            return True
        return False
