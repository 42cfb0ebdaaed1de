"""The LLM engine of one replica: continuous batching over a fixed-slot KV cache, CUDA-graph decode.

Design (see README "Serving"; the model side lives in ``serving.model``):
- The loaded Hugging Face model (fp16/bf16, or GPTQ through GPTQModel, whose QuantLinear modules replace the
  linears) provides the weights; ``LlamaRunner`` runs a compact Llama-family forward over them with its own
  attention over ``KVCache`` (one slot of ``max_model_len`` tokens per running sequence, optionally int8).
- The cache is sized from ``gpu_memory_gb``: the budget minus what the loaded weights and a measured
  activation peak take. The process is capped with ``torch.cuda.set_per_process_memory_fraction``.
- A background thread runs the scheduler: each step admits waiting requests (chunked prefill into a free
  slot), then decodes one token for every running sequence. New requests join at token granularity;
  finished ones leave and the last slot is moved into the hole so the batch stays dense (rows 0..B-1).
- On CUDA the decode step (all layers, norm, lm_head) is captured as a CUDA graph per (batch bucket, context
  bucket); sampling, stop checks and detokenization run outside the graph.
- Callers use ``generate()`` (async iterator of ``StepOutput``); leaving the iterator early aborts the
  sequence and frees its slot.

Imports only torch/transformers (+gptqmodel for GPTQ checkpoints): no Ray, FastAPI or pydantic, so the
benchmark runs on machines without them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serving.errors import ContextLengthError, EngineDeadError, EngineError, QueueFullError
from serving.model import (
    GIB,
    DecodeGraphs,
    Int8Linear,
    KVCache,
    LlamaRunner,
    _buckets,
    load_model,
    resolve_device,
)
from serving.sampler import SamplingParams, TokenLogprob, sample

logger = logging.getLogger("serving.engine")


# ----------------------------------------------------------------------------------------------- requests


@dataclass
class StepOutput:
    """New text/tokens of one sequence since its last output; ``finish_reason`` set on the last one."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class RequestTimes:
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    __slots__ = ("id", "prompt_ids", "params", "sink", "output_ids", "slot", "pos", "text", "emitted",
                 "prefix_offset", "read_offset", "pending_ids", "pending_lp", "generator", "times", "finished",
                 "finish_reason", "counts", "stop_hold")

    def __init__(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Any], None]):
        self.id = seq_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.output_ids: list[int] = []
        self.slot = -1
        self.pos = 0  # tokens in the cache
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


class StatsListener:
    """Hooks the engine calls from its thread (``serving.metrics.EngineMetrics`` implements them)."""

    def on_admitted(self, seq: Sequence) -> None: ...
    def on_token(self, seq: Sequence, now: float) -> None: ...
    def on_finished(self, seq: Sequence) -> None: ...
    def on_step(self, running: int, waiting: int, kv_usage: float) -> None: ...


# ----------------------------------------------------------------------------------------------- engine


@dataclass
class EngineOptions:
    """Plain mirror of ``serving.config.EngineConfig`` (the engine must not need pydantic)."""

    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_gb: float | None = 4.0
    cpu_kv_cache_gb: float = 0.5
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_waiting: int = 64
    max_prefill_tokens: int = 4096
    prefill_chunk: int = 256
    kv_cache_dtype: str = "auto"
    kv_cache_tokens: int | None = None
    embed_on_host: bool | None = None
    lm_head_int8: bool = False
    cuda_graphs: bool = True
    compile: bool = False
    fuse_projections: bool = False
    graph_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 24, 32, 48, 64])
    gptq_backend: str = "auto"
    warmup: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> EngineOptions:
        data = cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class RequestStream:
    """Async iterator over one sequence's ``StepOutput``s; ``cancel()`` aborts it and frees its slot."""

    def __init__(self, engine: LLMEngine, seq: Sequence, q: asyncio.Queue):
        self.engine, self.seq, self.q, self.done = engine, seq, q, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.done:
            raise StopAsyncIteration
        out = await self.q.get()
        if isinstance(out, BaseException):
            self.done = True
            raise out
        if out.finish_reason is not None:
            self.done = True
        return out

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.seq.id)


class LLMEngine:
    """Owns model, tokenizer, KV cache and the scheduler thread. ``load()`` then ``start()``; thread-safe API."""

    def __init__(self, model_path: str | Path, options: EngineOptions | None = None, tokenizer_path: str | None = None,
                 chat_template: str | None = None, stats: StatsListener | None = None):
        self.path = Path(model_path)
        self.opts = options or EngineOptions()
        self.tokenizer_path = tokenizer_path
        self.chat_template = chat_template
        self.stats = stats or StatsListener()
        self.device = resolve_device(self.opts.device)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.info: dict[str, Any] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat: float = time.monotonic()  # the scheduler loop's latest iteration (idle: every 0.5 s)
        self.tokenizer = None
        self.runner: LlamaRunner | None = None
        self.graphs: DecodeGraphs | None = None
        self.max_model_len = self.opts.max_model_len
        self.num_slots = 0
        self._fit_detail = ""
        # Tests only: seconds added to every decode step, so that a tiny CPU model cannot finish a stream in the
        # moment between a client's hang-up and the server noticing it (tests/cpu/test_serving.py).
        self._test_step_delay = float(os.environ.get("SERVING_TEST_STEP_DELAY_S") or 0)

    # ------------------------------------------------------------------ setup
    def load(self) -> None:
        """Load weights and tokenizer, size and allocate the KV cache, capture graphs, warm up."""
        from transformers import AutoTokenizer

        t0 = time.monotonic()
        o = self.opts
        cuda = self.device.type == "cuda"
        budget = None
        if cuda:
            torch.cuda.set_device(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            if o.gpu_memory_gb is not None:
                budget = int(o.gpu_memory_gb * GIB)
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path or str(self.path))
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        model, is_gptq = load_model(self.path, self.device, o.dtype, o.gptq_backend)
        cfg_len = getattr(model.config, "max_position_embeddings", None) or o.max_model_len
        self.max_model_len = min(o.max_model_len, cfg_len)
        embed_on_host = o.embed_on_host if o.embed_on_host is not None else (cuda and budget is not None)
        self.runner = runner = LlamaRunner(model, self.device, embed_on_host, o.lm_head_int8, o.fuse_projections)
        compiled = runner.compile_decode() if o.compile else False
        self._model = model
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        weights_bytes = torch.cuda.memory_allocated(self.device) if cuda else 0
        quant = o.kv_cache_dtype == "int8"
        per_tok = KVCache.bytes_per_token(len(runner.layers), runner.kv_heads, runner.head_dim, runner.dtype, quant)
        chunk = min(o.prefill_chunk, self.max_model_len)
        # measure the activation peak of one prefill chunk (eager, outside any graph pool) with a small cache
        act_bytes = 0
        if cuda:
            runner.cache = KVCache(len(runner.layers), 1, self.max_model_len, runner.kv_heads,
                                   runner.head_dim, runner.dtype, self.device, quant)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            runner.prefill([0] * chunk, 0, 0, want_logits=True)
            torch.cuda.synchronize()
            # what the first step leaves allocated (library workspaces, e.g. cuBLAS's) is counted once, in the
            # reserved memory the fit loop reads; the reserve is the transient peak above it
            kept = torch.cuda.memory_allocated(self.device)
            act_bytes = torch.cuda.max_memory_allocated(self.device) - kept
            self.info["memory_mib"] = {"weights": weights_bytes >> 20, "first_step_kept": (kept - base) >> 20,
                                       "prefill_chunk_peak": act_bytes >> 20}
            runner.cache = None
            torch.cuda.empty_cache()
        # an eager decode step (no graphs) also needs, per running row, one layer's dequantized K and V (and their
        # temporaries) and the logits; a graphed step keeps those in the graph pool, which the fit loop measures
        elem = torch.tensor([], dtype=runner.dtype).element_size()
        decode_row = (self.max_model_len * runner.kv_heads * runner.head_dim * 4 * elem if quant else 0) + \
            runner.vocab * 8

        def act_need(slots: int, graphed: bool) -> int:  # kept free beyond the cache (and graph pool)
            return int(max(act_bytes, 0 if graphed else slots * decode_row) * 1.25) + 32 * 1024**2

        if o.kv_cache_tokens is not None:
            kv_tokens = o.kv_cache_tokens
        elif cuda and budget is not None:
            graph_guess = 48 * 1024**2 if o.cuda_graphs else 0  # first guess; the fit loop below measures
            reserve = act_need(0, True)
            row_share = 0 if o.cuda_graphs else int(decode_row * 1.25) // self.max_model_len
            kv_tokens = max(self.max_model_len,
                            (budget - weights_bytes - reserve - graph_guess) // (per_tok + row_share))
            self._fit_detail = (f"budget {budget >> 20} MiB = weights {weights_bytes >> 20} MiB + activation "
                                f"reserve {reserve >> 20} MiB + KV cache ({per_tok} B per token) + CUDA graphs")
            logger.info("budget fit: %s; first try %d slots", self._fit_detail, kv_tokens // self.max_model_len)
        elif cuda:
            kv_tokens = o.max_num_seqs * self.max_model_len
        else:
            kv_tokens = int(o.cpu_kv_cache_gb * GIB) // per_tok
        self.ctx_buckets = _buckets(self.max_model_len)
        fit = cuda and budget is not None and o.kv_cache_tokens is None
        # allocate cache + graphs, measure the total against the budget, give up one slot at a time until it fits
        for _attempt in range(o.max_num_seqs + 1):
            try:
                self._allocate(kv_tokens, quant, oom_raises=fit)
            except torch.OutOfMemoryError as e:
                over = self.max_model_len * per_tok
                logger.info("budget fit: %d slots do not fit (%s); one fewer", self.num_slots, str(e)[:120])
            else:
                if not fit:
                    break
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                reserved = torch.cuda.memory_reserved(self.device)
                allocated = torch.cuda.memory_allocated(self.device)
                kv_bytes, reserve = runner.cache.nbytes(), act_need(self.num_slots, self.graphs is not None)
                over = reserved + reserve - budget
                self.info["memory_mib"].update({
                    "kv_cache": kv_bytes >> 20, "allocated": allocated >> 20, "reserved": reserved >> 20,
                    "other_allocated": (allocated - weights_bytes - kv_bytes) >> 20,
                    "reserved_not_allocated": (reserved - allocated) >> 20, "prefill_reserve": reserve >> 20,
                    "pools": _pool_summary(self.device)})
                if over <= 0:
                    break
                logger.info("budget fit: %d slots leave %d MiB too little for prefill: %s", self.num_slots,
                            over >> 20, json.dumps(self.info["memory_mib"]))
            kv_tokens = min(kv_tokens, self.num_slots * self.max_model_len) - max(self.max_model_len,
                                                                                  -(-over // per_tok))
            self.graphs = None
            runner.cache = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            raise EngineError("could not fit the KV cache and CUDA graphs into engine.gpu_memory_gb")
        self.eos_ids = self._eos_ids(model)
        if self.graphs is not None:
            self.info["decode_graph_ms"] = self.graphs.time_replay()
        self.info.update({
            "model": str(self.path), "gptq": is_gptq, "device": str(self.device), "dtype": str(runner.dtype),
            "layers": len(runner.layers), "kv_cache_dtype": "int8" if quant else str(runner.dtype),
            "kv_bytes_per_token": per_tok, "kv_cache_bytes": runner.cache.nbytes(), "num_slots": self.num_slots,
            "max_model_len": self.max_model_len, "embed_on_host": runner.embed_on_host,
            "lm_head_int8": isinstance(runner.lm_head, Int8Linear), "cuda_graphs": self.graphs is not None,
            "compiled_decode": compiled, "fused_projections": {"qkv": len(runner.fused_qkv),
                                                                "gate_up": len(runner.fused_gate_up)},
            "weights_bytes_on_gpu": weights_bytes, "activation_probe_bytes": act_bytes,
            "gpu_memory_budget_bytes": budget, "load_s": round(time.monotonic() - t0, 2),
        })
        if cuda:
            torch.cuda.synchronize()
            self.info["allocated_after_load_bytes"] = torch.cuda.memory_allocated(self.device)
            self.info["peak_allocated_load_bytes"] = torch.cuda.max_memory_allocated(self.device)
        logger.info("engine loaded %s", json.dumps(self.info))

    def _allocate(self, kv_tokens: int, quant: bool, oom_raises: bool = False) -> None:
        """Cache of ``kv_tokens // max_model_len`` slots, then CUDA graphs. A capture that runs out of memory
        raises when ``oom_raises`` and a slot can still be given up (graphs are worth more than one slot);
        any other capture failure falls back to eager decode."""
        o, runner = self.opts, self.runner
        self.num_slots = min(o.max_num_seqs, kv_tokens // self.max_model_len)
        if self.num_slots < 1:
            raise EngineError(
                f"the memory budget leaves room for {max(0, kv_tokens)} cached tokens, less than one sequence of "
                f"max_model_len={self.max_model_len}: raise engine.gpu_memory_gb, lower engine.max_model_len, or "
                f"set engine.kv_cache_dtype=int8 / engine.embed_on_host / engine.lm_head_int8. "
                f"{self._fit_detail}".strip())
        runner.cache = KVCache(len(runner.layers), self.num_slots, self.max_model_len, runner.kv_heads,
                               runner.head_dim, runner.dtype, self.device, quant)
        self.graphs = None
        if self.device.type == "cuda" and o.cuda_graphs:
            sizes = sorted({min(b, self.num_slots) for b in o.graph_batch_sizes})
            graphs = DecodeGraphs(runner, sizes, self.ctx_buckets)
            try:
                graphs.capture()
                self.graphs = graphs
            except RuntimeError as e:  # a kernel that cannot be captured: run eager, say so
                del graphs
                if isinstance(e, torch.OutOfMemoryError) and oom_raises and self.num_slots > 1:
                    raise
                logger.warning("CUDA graph capture failed, decoding eagerly: %s", e)
                self.info["cuda_graphs_error"] = str(e)[:500]
                torch.cuda.synchronize()

    def _eos_ids(self, model: torch.nn.Module) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(model, "generation_config", None), model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, list | tuple):
                ids.update(int(x) for x in e)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def start(self) -> None:
        """Start the scheduler thread; warm up; then set ``ready``."""
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def load_and_start(self) -> None:
        try:
            self.load()
            self.start()
            if self.opts.warmup:
                self._warmup()
            self.ready.set()
        except BaseException as e:  # noqa: BLE001 - recorded for /ready and re-raised
            self.error = e
            logger.exception("engine failed to start")
            raise

    def _warmup(self) -> None:
        done = threading.Event()
        outs: list[StepOutput] = []

        def sink(o: Any) -> None:
            outs.append(o)
            if isinstance(o, BaseException) or o.finish_reason:
                done.set()

        self.add_request([self.tokenizer.eos_token_id or 0] * 4, SamplingParams(max_tokens=4, ignore_eos=True),
                         sink, seq_id="warmup")
        if not done.wait(600):
            raise EngineError("warm-up generation did not finish")
        if isinstance(outs[-1], BaseException):
            raise outs[-1]

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())

    # ------------------------------------------------------------------ API (any thread)
    def add_request(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Any], None],
                    seq_id: str | None = None) -> Sequence:
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty", param="messages")
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the messages, {params.max_tokens} in the completion). "
                f"Please reduce the length of the messages or completion.")
        seq = Sequence(seq_id or f"seq-{next(self._ids)}", list(prompt_ids), params, sink)
        with self._lock:
            if self._num_waiting >= self.opts.max_waiting + max(0, self.num_slots - len(self._running)):
                raise QueueFullError(f"the server is at capacity ({self.num_slots} running, "
                                     f"{self._num_waiting} waiting); retry later")
            self._num_waiting += 1
        self._inbox.put(seq)
        return seq

    def abort(self, seq_id: str) -> None:
        self._inbox.put(("abort", seq_id))

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Admit a request now (raising ``QueueFullError``/``ContextLengthError`` here) and return its stream.

        Must be called from the event loop that will consume the stream."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        seq = self.add_request(prompt_ids, params, lambda o: loop.call_soon_threadsafe(q.put_nowait, o), request_id)
        return RequestStream(self, seq, q)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream ``StepOutput``s; raises ``EngineError`` subclasses; closing early aborts the sequence."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        seq = self.add_request(prompt_ids, params, lambda o: loop.call_soon_threadsafe(q.put_nowait, o), request_id)
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                if out.finish_reason is not None:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(seq.id)

    def load_stats(self) -> dict[str, Any]:
        return {"running": len(self._running), "waiting": self._num_waiting, "slots": self.num_slots,
                "kv_usage": self._kv_usage()}

    def _kv_usage(self) -> float:
        if not self.num_slots:
            return 0.0
        return sum(s.pos for s in list(self._running)) / (self.num_slots * self.max_model_len)

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._drain_inbox(block=not self._running and not self._waiting)
                if self._stop.is_set():
                    break
                self._admit()
                if self._running:
                    self._decode_step()
                    if self._test_step_delay:
                        time.sleep(self._test_step_delay)
                self.stats.on_step(len(self._running), self._num_waiting, self._kv_usage())
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to every caller
            logger.exception("engine loop died")
            self.error = e
            for s in list(self._running) + list(self._waiting):
                s.sink(EngineDeadError(f"engine failure: {e}"))
            self._running.clear()
            self._waiting.clear()

    def _drain_inbox(self, block: bool) -> None:
        items = []
        try:
            # idle: wake at least every 0.5 s so ``heartbeat`` stays fresh for the watchdog
            items.append(self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        for it in items:
            if it is None:
                continue
            if isinstance(it, tuple):
                self._aborts.add(it[1])
            else:
                self._waiting.append(it)
        if self._aborts:
            for s in [s for s in self._waiting if s.id in self._aborts]:
                self._waiting.remove(s)
                with self._lock:
                    self._num_waiting -= 1
                s.finish_reason = "abort"
                self._finish(s, notify=False)
            for s in [s for s in self._running if s.id in self._aborts]:
                s.finish_reason = "abort"
                self._finish(s, notify=False)
            self._aborts.clear()

    def _admit(self) -> None:
        budget = self.opts.max_prefill_tokens
        while self._waiting and len(self._running) < self.num_slots and budget > 0:
            seq = self._waiting.popleft()
            with self._lock:
                self._num_waiting -= 1
            seq.slot = len(self._running)
            seq.times.scheduled = time.monotonic()
            self._running.append(seq)
            self.stats.on_admitted(seq)
            try:
                ids = seq.prompt_ids
                chunk = self.opts.prefill_chunk
                logits = None
                for s in range(0, len(ids), chunk):
                    last = s + chunk >= len(ids)
                    logits = self.runner.prefill(ids[s:s + chunk], seq.slot, s, want_logits=last)
                seq.pos = len(ids)
                budget -= len(ids)
                token, lps = sample(logits[None], [seq])
                self._append(seq, token[0], lps[0] if lps else None)
            except EngineError as e:
                seq.sink(e)
                self._finish(seq, notify=False)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        seqs = self._running
        last = torch.tensor([s.output_ids[-1] for s in seqs], dtype=torch.long)
        pos_list = [s.pos for s in seqs]
        h = self.runner.embed(last).unsqueeze(1)
        pos = torch.tensor(pos_list, dtype=torch.long).to(self.device, non_blocking=True)
        ctx = next(c for c in self.ctx_buckets if c >= max(pos_list) + 1)
        if self.graphs is not None:
            logits = self.graphs.run(h, pos, ctx)
        else:
            logits = self.runner.decode(h, pos, ctx)
        for s in seqs:
            s.pos += 1
        tokens, lps = sample(logits, seqs)
        for i, s in enumerate(list(seqs)):
            self._append(s, tokens[i], lps[i] if lps else None)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> None:
        now = time.monotonic()
        if seq.times.first_token is None:
            seq.times.first_token = now
        self.stats.on_token(seq, now)
        seq.times.last_token = now
        p = seq.params
        if seq.counts is not None:
            seq.counts[token] += 1
        if not p.ignore_eos and (token in self.eos_ids or token in p.stop_token_ids):
            seq.output_ids.append(token)
            seq.finish_reason = "stop"
            self._finish(seq)
            return
        seq.output_ids.append(token)
        seq.pending_ids.append(token)
        if lp is not None:
            seq.pending_lp.append(lp)
        self._detok(seq)
        if p.stop:
            start = max(0, seq.emitted - seq.stop_hold - 1)
            hits = [i for i in (seq.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                seq.finish_reason = "stop"
                self._finish(seq)
                return
        if len(seq.output_ids) >= p.max_tokens or seq.pos + 1 >= self.max_model_len:
            seq.finish_reason = "length"
            self._finish(seq)
            return
        limit = len(seq.text) - seq.stop_hold if p.stop else len(seq.text)
        if limit > seq.emitted or (seq.pending_ids and not p.stop):
            self._emit(seq, limit, None)

    def _detok(self, seq: Sequence) -> None:
        ids = seq.output_ids
        tok = self.tokenizer
        prefix = tok.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        full = tok.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _emit(self, seq: Sequence, upto: int, finish: str | None) -> None:
        upto = max(upto, seq.emitted)
        text = seq.text[seq.emitted:upto]
        seq.emitted = upto
        out = StepOutput(text, seq.pending_ids, seq.pending_lp if seq.params.logprobs else None, finish,
                         len(seq.prompt_ids), len(seq.output_ids))
        seq.pending_ids, seq.pending_lp = [], []
        seq.sink(out)

    def _finish(self, seq: Sequence, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.times.finished = time.monotonic()
        if seq in self._running:
            i = self._running.index(seq)
            lastseq = self._running[-1]
            if lastseq is not seq:  # keep rows dense: move the last row's cache into the hole
                self.runner.cache.move(lastseq.slot, seq.slot, lastseq.pos)
                lastseq.slot = seq.slot
                self._running[i] = lastseq
            self._running.pop()
        # metrics first: a client that reads /metrics as soon as its answer arrives sees this request counted
        self.stats.on_finished(seq)
        self.stats.on_step(len(self._running), self._num_waiting, self._kv_usage())
        if notify:
            self._emit(seq, len(seq.text), seq.finish_reason)


def _pool_summary(device: torch.device) -> dict[str, list[int]]:
    """[reserved, allocated] MiB per allocator pool ("main", or a CUDA-graph pool by id) from the snapshot."""
    out: dict[str, list[int]] = {}
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device", device.index) != device.index:
            continue
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        tot = out.setdefault("main" if pool == (0, 0) else "graph" + ".".join(map(str, pool)), [0, 0])
        tot[0] += seg["total_size"]
        tot[1] += seg["allocated_size"]
    return {k: [v[0] >> 20, v[1] >> 20] for k, v in out.items()}
