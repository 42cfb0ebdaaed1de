"""The LLM engine of one replica: continuous batching over a paged KV cache with prefix caching, CUDA-graph
decode. The public face (``submit``/``generate``/``abort``/``load_stats``) is what the API layer and in-process
users (PPO rollouts) call; the parts live beside it:

- ``serving.model`` loads the weights (HF fp16/bf16, or GPTQ through GPTQModel);
- ``serving.runner`` runs the forward with attention through block tables, and the CUDA graphs;
- ``serving.kv_cache`` owns the blocks, block tables and the prefix cache;
- ``serving.scheduler`` decides each step: admission by free blocks, chunked prefill after the cached prefix,
  preemption (recompute) when blocks run out;
- ``serving.memory`` reports where the GPU memory went (``MemoryReport``, NVML included).

The cache is sized from ``gpu_memory_gb`` counted as nvidia-smi counts the process: the budget minus what the
process already holds on the GPU after loading (CUDA context, libraries, weights, by NVML) minus a measured
prefill reserve and the CUDA graphs' pool. A background thread runs the scheduler loop; sampling, stop checks and
detokenization run outside the graphs. A decode step's inputs are one packed host tensor kept between steps
(``serving.decode_inputs``) and one copy; with ``overlap_decode`` the next step is queued on the device before the
host has this step's tokens (``_launch_ahead``/``_take_ahead``).

Imports torch/transformers (+gptqmodel for GPTQ checkpoints) and pydantic (the config): no Ray or FastAPI.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.config import EngineConfig
from serving.decode_inputs import DecodeInputs
from serving.errors import ContextLengthError, EngineDeadError, EngineError, QueueFullError
from serving.kv_cache import KVBlocks, KVCacheManager
from serving.memory import (
    MIB,
    MemoryReport,
    process_gpu_mib,
    set_alloc_conf,
    set_cuda_stack_limit,
)
from serving.model import GIB, Int8Linear, host_module_names, load_model, resolve_device
from serving.prefill_batch import can_batch, prefill_fresh
from serving.runner import DecodeGraphs, LlamaRunner, buckets
from serving.sampler import SamplePlan, SamplingParams, TokenLogprob, sample, to_device
from serving.scheduler import PrefillChunk, RequestTimes, Scheduler, Sequence, StatsListener

__all__ = ["ContextLengthError", "EngineConfig", "EngineDeadError", "EngineError", "EngineOptions", "LLMEngine",
           "QueueFullError", "RequestStream", "RequestTimes", "SamplingParams", "Sequence", "StatsListener",
           "StepOutput"]

logger = logging.getLogger("serving.engine")

# The engine's options are the pydantic EngineConfig; the old name stays for callers (bench, API layer).
EngineOptions = EngineConfig


@dataclass
class StepOutput:
    """New text/tokens of one sequence since its last output; ``finish_reason`` set on the last one."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied (their prefill skipped)


class RequestStream:
    """Async iterator over one sequence's ``StepOutput``s; ``cancel()`` aborts it and frees its blocks."""

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
    """Owns model, tokenizer, KV cache and the scheduler thread. ``load_and_start()``; thread-safe API."""

    def __init__(self, model_path: str | Path, options: EngineConfig | dict | None = None,
                 tokenizer_path: str | None = None, chat_template: str | None = None,
                 stats: StatsListener | None = None):
        self.path = Path(model_path)
        self.opts = EngineConfig() if options is None else EngineConfig.from_config(options)
        self.tokenizer_path = tokenizer_path
        self.chat_template = chat_template
        self.stats = stats or StatsListener()
        self.device = resolve_device(self.opts.device)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.info: dict[str, Any] = {}
        self.memory = MemoryReport(device=str(self.device))
        self.heartbeat: float = time.monotonic()  # the scheduler loop's latest iteration (idle: every 0.5 s)
        self._inbox: queue.Queue = queue.Queue()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat: float = time.monotonic()  # the scheduler loop's latest iteration (idle: every 0.5 s)
        self.tokenizer = None
        self.runner: LlamaRunner | None = None
        self.graphs: DecodeGraphs | None = None
        self.kv: KVCacheManager | None = None
        self.sched: Scheduler | None = None
        self.max_model_len = self.opts.max_model_len or 0
        self._input_bufs: list[DecodeInputs] = []
        self._input_turn = 0
        self._plan: SamplePlan | None = None
        self._plan_seqs: list[Sequence] = []
        # ``overlap_decode``: the step queued ahead (rows, the positions it assumed, logits, the shapes it ran at)
        self._ahead: tuple | None = None
        self.ctx_buckets: list[int] = []
        self._fit_detail = ""
        self._given: tuple[Any, Any] | None = None  # (model, tokenizer) of ``from_model``
        # Tests only: seconds added to every decode step, so that a tiny CPU model cannot finish a stream in the
        # moment between a client's hang-up and the server noticing it (tests/cpu/test_serving.py).
        self._test_step_delay = float(os.environ.get("SERVING_TEST_STEP_DELAY_S") or 0)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, options: EngineConfig | dict | None = None,
                   stats: StatsListener | None = None, device: torch.device | None = None) -> LLMEngine:
        """An engine over an in-memory HF causal LM (already on its device) and its tokenizer, loading nothing: the
        runner calls the model's own modules, so generation reads the live parameters in place (PPO/GRPO rollouts
        in the training process see every in-place optimizer update). Options that rewrite the model's modules
        (``fuse_projections``, ``lm_head_int8``, ``embed_on_host``) are refused: they would copy or replace the
        weights the caller keeps training."""
        eng = cls(getattr(model.config, "_name_or_path", None) or "in-memory", options, stats=stats)
        bad = [k for k in ("fuse_projections", "lm_head_int8", "lm_head_int4", "embed_on_host") if getattr(eng.opts, k)]
        if bad:
            raise EngineError(f"engine options {bad} rewrite the model's weights; an in-memory model needs them off")
        eng._given = (model, tokenizer)
        if device is not None:  # the model's own device (``options.device`` names no index: a torchrun rank's GPU)
            eng.device = device
            eng.memory.device = str(device)
        return eng

    # ------------------------------------------------------------------ setup
    @property
    def num_slots(self) -> int:
        """Most sequences that can run at once (``max_num_seqs``; blocks decide how many actually do)."""
        return self.opts.max_num_seqs if self.kv is not None else 0

    def _start_cuda(self) -> int | None:
        """Process-level CUDA settings that only work before CUDA starts: allocator config, stack limit."""
        set_alloc_conf()
        stack = None
        if self.opts.cuda_stack_limit is not None:
            stack = set_cuda_stack_limit(self.device.index or 0, self.opts.cuda_stack_limit)
        torch.cuda.set_device(self.device)
        torch.zeros(1, device=self.device)  # the context now, so NVML sees the process
        return stack

    def _nvml_mib(self) -> int | None:
        torch.cuda.synchronize(self.device)
        time.sleep(0.3)  # nvidia-smi's per-process figure trails a fresh allocation (the context probe waits too)
        mib, src = process_gpu_mib(self.device.index or 0)
        self.memory.nvml_source = src
        return mib

    def _mark(self, step: str) -> None:
        """The process's memory after one load step into ``memory.steps`` (NVML on CUDA: one sync and 0.3 s)."""
        if self.device.type != "cuda":
            self.memory.steps.append([step, None, 0, 0])
            return
        mib = self._nvml_mib()
        self.memory.steps.append([step, mib, torch.cuda.memory_allocated(self.device) // MIB,
                                  torch.cuda.memory_reserved(self.device) // MIB])

    def load(self) -> None:
        """Load weights and tokenizer, size and allocate the KV blocks, capture graphs."""
        from transformers import AutoTokenizer

        t0 = time.monotonic()
        o = self.opts
        cuda = self.device.type == "cuda"
        mem = self.memory
        budget = None
        if cuda:
            mem.cuda_stack_limit = self._start_cuda()
            self._mark("context")
            total = torch.cuda.get_device_properties(self.device).total_memory
            if o.gpu_memory_gb is not None:
                budget = int(o.gpu_memory_gb * GIB)
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), self.device)
                mem.budget = budget // MIB
            torch.cuda.reset_peak_memory_stats(self.device)
        embed_on_host = o.embed_on_host if o.embed_on_host is not None else (cuda and budget is not None)
        if self._given is not None:
            (model, self.tokenizer), is_gptq = self._given, False
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path or str(self.path))
            if self.chat_template:
                self.tokenizer.chat_template = self.chat_template
            host = host_module_names(self.path, embed_on_host, o.lm_head_int8 or o.lm_head_int4) if cuda else ()
            model, is_gptq = load_model(self.path, self.device, o.dtype, o.gptq_backend, host_modules=host)
        self._mark("weights")
        model_len = int(getattr(model.config, "max_position_embeddings", None) or o.max_model_len or 2048)
        want_len = min(o.max_model_len or model_len, model_len)
        # vendor_blas=false is a CUDA memory setting (kernel images outside the allocator); CPU serving keeps torch's
        # matmul and SDPA (the Triton kernels would run interpreted). The runner takes it on CPU in tests.
        vendor_blas = o.vendor_blas or not cuda
        self.runner = runner = LlamaRunner(model, self.device, embed_on_host, o.lm_head_int8, o.fuse_projections,
                                           paged_kernel=o.attention_kernel == "auto", vendor_blas=vendor_blas,
                                           lm_head_int4=o.lm_head_int4)
        self._mark("lm_head")
        compiled = runner.compile_decode() if o.compile else False
        self._model = model
        bs = o.block_size
        quant = o.kv_cache_dtype == "int8"
        per_tok = KVBlocks.bytes_per_token(len(runner.layers), runner.kv_heads, runner.head_dim, runner.dtype,
                                           quant)
        per_block = per_tok * bs
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        weights_bytes = torch.cuda.memory_allocated(self.device) if cuda else 0
        mem.weights, mem.block_size, mem.kv_bytes_per_token = weights_bytes // MIB, bs, per_tok
        chunk = min(o.prefill_chunk, want_len)
        act_bytes = self._probe_prefill(chunk, quant, want_len) if cuda else 0
        self._mark("first_prefill")
        # an eager decode step (no graphs) also needs, per running row, the logits and (torch attention path) one
        # layer's gathered K and V and their temporaries; the Triton kernel reads K/V in place. A graphed step keeps
        # those in the graph pool, which the fit loop measures
        elem = torch.tensor([], dtype=runner.dtype).element_size()
        gathered = want_len * runner.kv_heads * runner.head_dim * 4 * elem if runner.decode_kernel is None else 0
        decode_row = gathered + runner.vocab * 8

        def act_need(graphed: bool) -> int:  # kept free beyond the cache (and graph pool)
            rows = 0 if graphed else min(o.max_num_seqs, 8) * decode_row
            return int(max(act_bytes, rows) * 1.25) + 32 * MIB

        fit = cuda and budget is not None and o.kv_cache_tokens is None
        if o.kv_cache_tokens is not None:
            num_blocks = -(-o.kv_cache_tokens // bs) + 1
        elif fit:
            used = self._nvml_mib()
            held = used * MIB if used is not None else torch.cuda.memory_reserved(self.device)
            if used is None:
                mem.notes.append("NVML did not list this process: the fit counts the allocator only")
            graph_guess = 64 * MIB if o.cuda_graphs else 0  # first guess; the fit loop below measures
            reserve = act_need(o.cuda_graphs)
            num_blocks = max(2, (budget - held - reserve - graph_guess) // per_block + 1)
            # Sequences shorter than the model's length: the prefill reserve (its last chunk gathers the whole
            # context) shrinks with them, so halve the probed length until the cache it leaves holds that length.
            # Measured on the H200 at 4 GiB: probed at 2,048 tokens the reserve was 254 MiB and left 16 tokens.
            length = want_len
            while (num_blocks - 1) * bs < length and length > chunk and o.max_model_len is None:
                length = max(chunk, length // 2)
                act_bytes = self._probe_prefill(chunk, quant, length)
                reserve = act_need(o.cuda_graphs)
                num_blocks = max(2, (budget - held - reserve - graph_guess) // per_block + 1)
            self._fit_detail = (f"budget {budget // MIB} MiB = process {held // MIB} MiB after loading (weights "
                                f"{weights_bytes // MIB} MiB) + prefill reserve {reserve // MIB} MiB + CUDA graphs "
                                f"+ KV cache ({per_tok} B per token)")
            logger.info("budget fit: %s; first try %d blocks", self._fit_detail, num_blocks - 1)
        elif cuda:
            num_blocks = o.max_num_seqs * -(-want_len // bs) + 1
        else:
            # host memory: the budget, but no more than 4 full-length sequences per running slot (a 512 MiB
            # cache of zeros took 4 s to allocate on the CI machine for a model that needs kilobytes)
            num_blocks = min(int(o.cpu_kv_cache_gb * GIB) // per_block,
                             4 * o.max_num_seqs * -(-want_len // bs)) + 1
        for _attempt in range(8):
            cap_tokens = (num_blocks - 1) * bs
            self._check_fits(cap_tokens, want_len, explicit=o.max_model_len is not None)
            self.max_model_len = min(want_len, cap_tokens)
            try:
                self._allocate(num_blocks, quant, oom_raises=fit)
            except torch.OutOfMemoryError as e:  # under the allocator cap: give up 64 MiB of blocks, retry
                logger.info("budget fit: %d blocks do not fit (%s)", num_blocks - 1, str(e)[:120])
                num_blocks -= max(1, 64 * MIB // per_block)
                self.graphs = runner.cache = None
                torch.cuda.empty_cache()
                continue
            if not fit:
                break
            torch.cuda.empty_cache()
            used = self._nvml_mib()
            reserved = torch.cuda.memory_reserved(self.device)
            held = used * MIB if used is not None else reserved
            reserve = act_need(self.graphs is not None)
            over = held + reserve - budget
            self._fill_memory(used, reserve)
            if over <= 0:
                break
            logger.info("budget fit: %d blocks leave %d MiB too little: %s", num_blocks - 1, over // MIB,
                        json.dumps(mem.to_dict()))
            num_blocks -= -(-over // per_block)
            self.graphs = None
            runner.cache = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            raise EngineError(f"could not fit the KV cache and CUDA graphs into engine.gpu_memory_gb: "
                              f"{self._fit_detail}")
        if not fit:
            self._fill_memory(self._nvml_mib() if cuda else None, act_need(self.graphs is not None) if cuda else 0)
        self._mark("fitted")
        self.kv = KVCacheManager(num_blocks, bs, o.enable_prefix_caching, extra_key=str(self.path.resolve()))
        self.sched = Scheduler(self.kv, o.max_num_seqs, o.max_prefill_tokens, o.prefill_chunk, self.stats,
                               admission_lookahead=o.admission_lookahead_tokens,
                               preemption_victim=o.preemption_victim, max_model_len=self.max_model_len)
        self.eos_ids = self._eos_ids(model)
        if self.graphs is not None:
            self.info["decode_graph_ms"] = self.graphs.time_replay()
        self.info.update({
            "model": str(self.path), "gptq": is_gptq, "device": str(self.device), "dtype": str(runner.dtype),
            "layers": len(runner.layers), "kv_cache_dtype": "int8" if quant else str(runner.dtype),
            "kv_bytes_per_token": per_tok, "kv_cache_bytes": runner.cache.nbytes(), "block_size": bs,
            "num_blocks": num_blocks - 1, "kv_cache_tokens": (num_blocks - 1) * bs, "max_num_seqs": o.max_num_seqs,
            "max_model_len": self.max_model_len, "model_max_len": model_len,
            "prefix_caching": o.enable_prefix_caching, "attention": runner.attention_path,
            "embed_on_host": runner.embed_on_host, "lm_head_int8": isinstance(runner.lm_head, Int8Linear),
            "lm_head": type(runner.lm_head).__name__, "vendor_blas": runner.vendor_blas,
            "cuda_graphs": self.graphs is not None, "compiled_decode": compiled,
            "fused_projections": {"qkv": len(runner.fused_qkv), "gate_up": len(runner.fused_gate_up)},
            "weights_bytes_on_gpu": weights_bytes, "activation_probe_bytes": act_bytes,
            "gpu_memory_budget_bytes": budget, "load_s": round(time.monotonic() - t0, 2),
            "memory_mib": mem.to_dict(),
        })
        logger.info("engine loaded %s", json.dumps(self.info))
        logger.info("memory report (MiB): %s", json.dumps(mem.to_dict()))

    def _check_fits(self, cap_tokens: int, want_len: int, explicit: bool) -> None:
        """Refuse to start when the cache cannot hold one full-length sequence (an explicit max_model_len), or
        holds less than one prefill chunk / 256 tokens (the model's own length, limited by the budget)."""
        floor = want_len if explicit else min(want_len, max(self.opts.prefill_chunk, 256))
        if cap_tokens < floor:
            raise EngineError(
                f"the memory budget leaves room for {max(0, cap_tokens)} cached tokens, less than one sequence of "
                f"{floor} tokens (max_model_len={want_len}): raise engine.gpu_memory_gb, lower "
                f"engine.max_model_len, or set engine.kv_cache_dtype=int8 / engine.embed_on_host / "
                f"engine.lm_head_int8 / engine.cuda_stack_limit / engine.vendor_blas=false. "
                f"{self._fit_detail}".strip())

    def _probe_prefill(self, chunk: int, quant: bool, context: int) -> int:
        """Transient peak of the costliest prefill chunk (eager, outside any graph pool): the last chunk of a
        ``context``-token sequence, whose attention gathers all of it. The probe's block table repeats a few
        blocks (garbage K/V, the same gather size) so it needs no full-length cache."""
        runner, bs = self.runner, self.opts.block_size
        nb = -(-chunk // bs) + 1
        runner.cache = KVBlocks(len(runner.layers), nb, bs, runner.kv_heads, runner.head_dim, runner.dtype,
                                self.device, quant)
        table = [i % (nb - 1) + 1 for i in range(-(-context // bs))]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        runner.prefill([0] * chunk, table, context - chunk, want_logits=True)
        torch.cuda.synchronize()
        # what the first step leaves allocated (library workspaces, e.g. cuBLAS's) is counted once, in what the
        # fit reads back; the reserve is the transient peak above it
        kept = torch.cuda.memory_allocated(self.device)
        act = torch.cuda.max_memory_allocated(self.device) - kept
        runner.cache = None
        torch.cuda.empty_cache()
        return act

    def _fill_memory(self, nvml_mib: int | None, reserve: int) -> None:
        m, runner = self.memory, self.runner
        m.kv_cache = runner.cache.nbytes() // MIB
        m.kv_blocks = runner.cache.num_blocks - 1
        m.kv_tokens = m.kv_blocks * runner.cache.block_size
        m.activation_reserve = reserve // MIB
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize()
        m.allocated = torch.cuda.memory_allocated(self.device) // MIB
        m.reserved = torch.cuda.memory_reserved(self.device) // MIB
        pools = _pool_summary(self.device)
        m.graph_pool = sum(v[0] for k, v in pools.items() if k != "main")
        m.workspaces = max(0, m.allocated - m.weights - m.kv_cache - sum(v[1] for k, v in pools.items()
                                                                         if k != "main"))
        m.process_nvml = nvml_mib
        m.outside_allocator = nvml_mib - m.reserved if nvml_mib is not None else None

    def memory_report(self) -> dict[str, Any]:
        """The typed report as a dict, with a fresh NVML reading on CUDA (what ``/ready`` shows)."""
        if self.device.type == "cuda" and self.runner is not None and self.runner.cache is not None:
            mib, _ = process_gpu_mib(self.device.index or 0)
            if mib is not None:
                self.memory.process_nvml = mib
                self.memory.outside_allocator = mib - torch.cuda.memory_reserved(self.device) // MIB
        return self.memory.to_dict()

    def _allocate(self, num_blocks: int, quant: bool, oom_raises: bool = False) -> None:
        """KV blocks, then CUDA graphs. A capture that runs out of memory raises when ``oom_raises`` (graphs are
        worth more than a few blocks); any other capture failure falls back to eager decode, said in ``info``."""
        o, runner = self.opts, self.runner
        runner.cache = KVBlocks(len(runner.layers), num_blocks, o.block_size, runner.kv_heads, runner.head_dim,
                                runner.dtype, self.device, quant)
        attempt = sum(1 for st in self.memory.steps if st[0].startswith("kv_cache"))
        tag = f"#{attempt + 1}" if attempt else ""
        self._mark("kv_cache" + tag)
        self.ctx_buckets = buckets(self.max_model_len)
        self.max_blocks_per_seq = -(-self.max_model_len // o.block_size)
        # the decode rows live on the host between steps; pinned on CUDA so their copy is asynchronous
        self._input_bufs = [DecodeInputs(o.max_num_seqs, self.max_blocks_per_seq, o.block_size,
                                         pin=self.device.type == "cuda") for _ in range(3 if o.overlap_decode else 1)]
        self.graphs = None
        if self.device.type == "cuda" and o.cuda_graphs:
            sizes = sorted({min(b, o.max_num_seqs) for b in o.graph_batch_sizes})
            graphs = DecodeGraphs(runner, sizes, self.ctx_buckets, self.max_blocks_per_seq,
                                  max_batch_tokens=2 * (num_blocks - 1) * o.block_size)
            try:
                graphs.capture(on_first_decode=lambda: self._mark("first_decode" + tag))
                self.graphs = graphs
                self._mark("graphs" + tag)
            except RuntimeError as e:  # a kernel that cannot be captured: run eager, say so
                del graphs
                if isinstance(e, torch.OutOfMemoryError) and oom_raises:
                    raise
                logger.warning("CUDA graph capture failed, decoding eagerly: %s", e)
                self.info["cuda_graphs_error"] = str(e)[:500]
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

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
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def load_and_start(self) -> None:
        try:
            self.load()
            self.start()
            if self.opts.warmup:
                self._warmup()
                self._mark("warmed_up")
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
        return self.add_requests([prompt_ids], [params], sink, [seq_id])[0]

    def add_requests(self, prompts: list[list[int]], params: list[SamplingParams], sink: Callable[[Any], None],
                     seq_ids: list[str | None] | None = None) -> list[Sequence]:
        """Several requests that reach the scheduler together (one inbox item): its next step admits them all, so
        a rollout's prompts are prefilled in one batched forward. All are checked before any is queued."""
        seqs = [self._new_sequence(ids, p, sink, sid)
                for ids, p, sid in zip(prompts, params, seq_ids or [None] * len(prompts), strict=True)]
        with self._lock:
            running = len(self.sched.running) if self.sched is not None else 0
            if self._num_waiting + len(seqs) > self.opts.max_waiting + max(0, self.opts.max_num_seqs - running):
                raise QueueFullError(f"the server is at capacity ({running} running, {self._num_waiting} "
                                     f"waiting); retry later")
            self._num_waiting += len(seqs)
        self._inbox.put(seqs)
        return seqs

    def _new_sequence(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Any], None],
                      seq_id: str | None) -> Sequence:
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        n = len(prompt_ids)
        if n == 0:
            raise EngineError("the prompt is empty")
        if n + params.max_tokens > self.max_model_len:
            held = self.kv.capacity_tokens if self.kv is not None else self.max_model_len
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens (the KV cache holds {held} "
                f"tokens). However, you requested {n + params.max_tokens} tokens ({n} prompt tokens and "
                f"max_tokens={params.max_tokens} completion tokens). Please shorten the prompt or the completion.")
        return Sequence(seq_id or f"seq-{next(self._ids)}", list(prompt_ids), params, sink)

    def abort(self, seq_id: str) -> None:
        self._inbox.put(("abort", seq_id))

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Admit a request now (raising ``QueueFullError``/``ContextLengthError`` here) and return its stream.

        Must be called from the event loop that will consume the stream."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(out: Any) -> None:
            # The consumer's loop can close before the engine has seen its abort (a caller's asyncio.run()
            # returned): its outputs are then dropped; raising here would kill the scheduler loop for everyone.
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(q.put_nowait, out)
                except RuntimeError:  # closed between the check and the call
                    pass
            if loop.is_closed():
                self.abort(seq.id)

        seq = self.add_request(prompt_ids, params, sink, request_id)
        return RequestStream(self, seq, q)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Stream ``StepOutput``s; raises ``EngineError`` subclasses; closing early aborts the sequence."""
        stream = self.submit(prompt_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()

    def load_stats(self) -> dict[str, Any]:
        s, kv = self.sched, self.kv
        return {"running": len(s.running) if s else 0, "waiting": self._num_waiting, "slots": self.num_slots,
                "kv_usage": kv.usage() if kv else 0.0, "free_blocks": kv.pool.num_free if kv else 0,
                "total_blocks": kv.pool.usable if kv else 0, "preemptions": s.num_preemptions if s else 0,
                "recomputed_tokens": s.recomputed_tokens if s else 0}

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        sched = self.sched
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._drain_inbox(block=not sched.running and not sched.waiting)
                if self._stop.is_set():
                    break
                self._step()
                self.stats.on_step(len(sched.running), self._num_waiting, self.kv.usage())
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to every caller
            logger.exception("engine loop died")
            self.error = e
            for s in list(sched.running) + list(sched.waiting):
                s.sink(EngineDeadError(f"engine failure: {e}"))
                self.kv.free(s.id)
            sched.running.clear()
            sched.waiting.clear()

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
                for seq in it:  # ``add_requests``' list
                    self.sched.add(seq)
        if self._aborts:
            sched = self.sched
            for s in [s for s in (*sched.waiting, *sched.running) if s.id in self._aborts]:
                s.finish_reason = "abort"
                self._finish(s, notify=False)
            self._aborts.clear()

    def _step(self) -> None:
        sched = self.sched
        for seq in sched.admit():
            with self._lock:
                self._num_waiting -= 1
            if seq.times.scheduled is None:
                seq.times.scheduled = time.monotonic()
                self.stats.on_admitted(seq)
        chunks = self._prefill_batched(sched.prefill_chunks())
        for ch in chunks:
            seq = ch.seq
            want = ch.last and seq.sample_after_prefill
            try:
                logits = self.runner.prefill(seq.compute_ids[ch.start:ch.end], self.kv.tables[seq.id].blocks,
                                             ch.start, want_logits=want)
            except EngineError as e:
                seq.sink(e)
                self._finish(seq, notify=False)
                continue
            seq.num_computed = ch.end
            sched.after_tokens(seq)
            if ch.last:
                seq.prefilled = True
                if want:
                    token, lps = sample(logits[None], [seq])
                    self._append(seq, token[0], lps[0] if lps else None)
        waiting = len(sched.waiting)
        batch = sched.schedule_decode()
        if len(sched.waiting) > waiting:  # preempted sequences wait again
            with self._lock:
                self._num_waiting += len(sched.waiting) - waiting
        if batch:
            self._decode_step(batch)
            if self._test_step_delay:
                time.sleep(self._test_step_delay)

    def _prefill_batched(self, chunks: list[PrefillChunk]) -> list[PrefillChunk]:
        """Whole prompts from position 0 in one forward (``serving.prefill_batch``), as many as fit
        ``prefill_chunk`` padded tokens (the activation bound the one-chunk path has); returns the other chunks."""
        fresh = [ch for ch in chunks if ch.start == 0 and ch.last]
        if len(fresh) < 2 or not can_batch(self.runner):
            return chunks
        groups: list[list[PrefillChunk]] = [[]]
        for ch in sorted(fresh, key=lambda c: c.end):  # by length: rows of one group pad less
            if groups[-1] and (len(groups[-1]) + 1) * ch.end > self.opts.prefill_chunk:
                groups.append([])
            groups[-1].append(ch)
        fresh = []
        for group in groups:
            if len(group) >= 2:
                self._run_prefill_group(group)
                fresh += group
        done = {id(ch) for ch in fresh}
        return [ch for ch in chunks if id(ch) not in done]

    def _run_prefill_group(self, group: list[PrefillChunk]) -> None:
        seqs = [ch.seq for ch in group]
        logits = prefill_fresh(self.runner, [s.compute_ids[:ch.end] for s, ch in zip(seqs, group, strict=True)],
                               [self.kv.tables[s.id].blocks for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.sample_after_prefill]
        for s, ch in zip(seqs, group, strict=True):
            s.num_computed = ch.end
            self.sched.after_tokens(s)
            s.prefilled = True
        if want:
            picked = [seqs[i] for i in want]
            tokens, lps = sample(logits[want] if len(want) < len(seqs) else logits, picked)
            for j, s in enumerate(picked):
                self._append(s, tokens[j], lps[j] if lps else None)

    @torch.inference_mode()
    def _decode_step(self, seqs: list[Sequence]) -> None:
        # every row's inputs in one persistent host tensor, updated in place, and one copy to the device
        # (``serving.decode_inputs``; one tensor per input and per row's table cost 20+ small copies a step at 16
        # rows, and rebuilding the rows from Python lists every step ~45% of the host time at 16 rows on the CPU)
        bs, n = self.opts.block_size, len(seqs)
        ctx = next(c for c in self.ctx_buckets if c >= max(s.num_computed for s in seqs) + 1)
        logits = self._take_ahead(seqs, ctx)
        if logits is None:
            inp = self._next_inputs()
            inp.fill(seqs, self.kv.tables)
            logits, _ = self._launch(inp, n, ctx)
        plan = self._plan_for(seqs)
        ahead = None
        if self.opts.overlap_decode and not plan.need_lp and not self.runner.embed_on_host:
            def ahead(chosen: torch.Tensor) -> None:
                self._launch_ahead(seqs, chosen)
        tokens, lps = sample(logits, seqs, plan, before_wait=ahead)
        now = time.monotonic()
        for i, s in enumerate(seqs):
            s.num_computed += 1
            if s.num_computed % bs == 0:
                self.sched.after_tokens(s)
            self._append(s, tokens[i], lps[i] if lps else None, now)

    def _plan_for(self, seqs: list[Sequence]) -> SamplePlan:
        """The batch's ``SamplePlan``, made again only when the batch's sequences change."""
        old = self._plan_seqs
        if len(seqs) != len(old) or any(a is not b for a, b in zip(seqs, old, strict=True)):
            self._plan, self._plan_seqs = SamplePlan([s.params for s in seqs]), list(seqs)
        return self._plan

    def _next_inputs(self) -> DecodeInputs:
        """The host rows for the next launch. With ``overlap_decode`` three take turns: between two waits for
        sampled tokens at most two launches are queued (a step computed again, the step ahead) beside the one
        still running from before, so the buffer written is never one whose copy may still be running."""
        self._input_turn = (self._input_turn + 1) % len(self._input_bufs)
        return self._input_bufs[self._input_turn]

    def _launch(self, inp: DecodeInputs, n: int, ctx: int, tokens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, tuple]:
        """Queue the decode forward of ``inp``'s first ``n`` rows; returns the logits and what shapes it ran at
        (a graph's bucket, or the eager batch)."""
        runner = self.runner
        if self.graphs is not None:
            bucket = self.graphs.bucket(n, ctx)
            if bucket is not None:
                return self.graphs.run(inp.host, n, ctx, tokens), ("graph", bucket)
        host = inp.host[:n]
        h = runner.embed(host[:, 0].long()).unsqueeze(1) if runner.embed_on_host else None
        packed = host.to(self.device, non_blocking=True)
        if tokens is not None:
            packed[:, 0] = tokens
        return runner.decode_packed(packed, ctx, h), ("eager", n, ctx)

    def _launch_ahead(self, seqs: list[Sequence], chosen: torch.Tensor) -> None:
        """``overlap_decode``: queue the step after this one for the rows that go on unless they sample a stop
        (not at their length limit), their last tokens taken from ``chosen`` on the device. Skipped while requests
        wait for admission (the blocks it takes ahead would be theirs) or when the pool lacks a row's next block."""
        if self.sched.waiting:
            return
        kv, limit = self.kv, self.max_model_len
        keep = [i for i, s in enumerate(seqs)
                if len(s.output_ids) + 1 < s.params.max_tokens and s.num_computed + 2 < limit]
        if not keep:
            return
        rows = [seqs[i] for i in keep]
        grow = [s for s in rows if kv.append_slot_needed(s.id, s.num_computed + 1)]
        if len(grow) > kv.pool.num_free:
            return
        for s in grow:
            kv.grow(s.id)
        inp = self._next_inputs()
        ctx = next(c for c in self.ctx_buckets if c >= inp.fill(rows, kv.tables, ahead=1))
        toks = chosen if len(keep) == len(seqs) else chosen[to_device(torch.tensor(keep), chosen.device)]
        logits, shapes = self._launch(inp, len(rows), ctx, toks)
        self._ahead = (rows, [s.num_computed + 1 for s in rows], logits, shapes)

    def _take_ahead(self, seqs: list[Sequence], ctx: int) -> torch.Tensor | None:
        """The logits of the step queued ahead when they are what this step computes, else None (computed again:
        its K/V writes are then written over with this step's).

        The same rows at the positions it assumed: its logits. Fewer rows (some stopped, were aborted or
        preempted): the kept rows' logits when it ran the graph bucket (batch and context) this step would, since a
        row's result within one bucket does not depend on the other rows; an eager step's shapes are its batch's
        own, so never there."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        rows, expect, logits, shapes = ahead
        if len(rows) == len(seqs) and all(a is b for a, b in zip(rows, seqs, strict=True)):
            return logits if all(s.num_computed == e for s, e in zip(seqs, expect, strict=True)) else None
        if shapes[0] != "graph" or self.graphs.bucket(len(seqs), ctx) != shapes[1]:
            return None
        where = {id(s): i for i, s in enumerate(rows)}
        idx = []
        for s in seqs:
            i = where.get(id(s))
            if i is None or s.num_computed != expect[i]:
                return None
            idx.append(i)
        return logits[to_device(torch.tensor(idx), logits.device)]

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None, now: float | None = None) -> None:
        """One new token of ``seq``: stop checks, then its output (``now``: one clock reading for a decode step's
        rows, which all got their token at the same moment)."""
        if now is None:
            now = time.monotonic()
        if seq.times.first_token is None:
            seq.times.first_token = now
        self.stats.on_token(seq, now)
        seq.times.last_token = now
        p = seq.params
        if seq.counts is not None:
            seq.counts[token] += 1
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:  # vLLM: ignore_eos keeps stop ids
            seq.output_ids.append(token)
            seq.finish_reason = "stop"
            self._finish(seq)
            return
        seq.output_ids.append(token)
        seq.pending_ids.append(token)
        if lp is not None:
            seq.pending_lp.append(lp)
        if p.detokenize or p.stop:
            self._detok(seq)
        if p.stop:
            start = max(0, seq.emitted - seq.stop_hold - 1)
            hits = [i for i in (seq.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                seq.finish_reason = "stop"
                self._finish(seq)
                return
        if len(seq.output_ids) >= p.max_tokens or seq.num_computed + 1 >= self.max_model_len:
            seq.finish_reason = "length"
            self._finish(seq)
            return
        if p.final_only:
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
                         len(seq.prompt_ids), len(seq.output_ids), seq.prompt_cached_tokens)
        seq.pending_ids, seq.pending_lp = [], []
        seq.sink(out)

    def _finish(self, seq: Sequence, notify: bool = True) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.times.finished = time.monotonic()
        if self.sched.remove(seq):
            with self._lock:
                self._num_waiting -= 1
        # metrics first: a client that reads /metrics as soon as its answer arrives sees this request counted
        self.stats.on_finished(seq)
        self.stats.on_step(len(self.sched.running), self._num_waiting, self.kv.usage())
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
