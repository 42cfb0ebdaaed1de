"""Rollouts for PPO and GRPO: the answers to a batch of left-padded prompts, by one of two generators with one
face, ``generate(input_ids, attention_mask, gen, greedy, seed) -> (sequences, mask)`` in ``ppo.sample``'s layout.

- ``HFRollout``: ``ppo.sample``, token by token through the training model's forward (the whole batch steps
  until its longest answer ends).
- ``EngineRollout``: ``serving.engine.LLMEngine`` in this process (paged KV cache, continuous batching, CUDA
  graphs on GPU), built by ``LLMEngine.from_model`` over the actor itself. ``shared`` weights: the engine's runner
  calls the actor's own modules, so it reads the parameters in place and sees every optimizer update at once;
  ``copy``: a copy in the compute dtype, refreshed in place before each rollout (``sync_s``). CUDA graphs record
  parameter addresses; the optimizers update in place (AdamW, HybridAdam, ZeRO's copy of the master weights into
  the working ones), and every rollout first compares the parameters' addresses with those at capture and
  rebuilds the engine if one moved (``rebuilds`` counts it), so a graph never reads a freed tensor.

Both stop a row at its first EOS (the stage's ``eos_ids``), after the token that completes a ``gen.stop`` string,
or at ``gen.max_new_tokens``, and sample with the same temperature, top-k and top-p. Sampled engine rollouts draw
row i from its own generator seeded ``seed + i`` (``rollout_seed``): reproducible whatever the batching, and so
across a kill and ``--resume``. Log-probs for the losses still come from the training forward.

Plugins (``check_plugin``): ddp, zero2 and 3d with tp_size 1 hold whole parameters on every rank, which the engine
reads (each rank runs its own engine over its own replica); Gemini keeps parameters in chunks that exist whole
only inside its own forward, and 3d with tp_size > 1 splits every projection over ranks: both are config errors
that name the way out (``rollout_engine=hf``, or zero2).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Protocol

import torch
from torch import nn

from training.config import ConfigError, GenerationConfig, RolloutOptions, TrainConfig

logger = logging.getLogger("training.rollout")

# graph batch buckets up to the engine's 256-row limit; a rollout of n rows also gets a bucket of exactly n
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_ENGINE_ROWS = 256


class Rollout(Protocol):
    name: str

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
                 greedy: bool = False, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pop_timings(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def rollout_seed(train_seed: int, step: int, rank: int) -> int:
    """The first row's seed of step ``step`` on ``rank`` (rows add their index): distinct per step and rank."""
    return (((train_seed * 1_000_003 + step) * 1_009 + rank) * 65_536) % (1 << 62)


def resolve_engine(opts: RolloutOptions, train: TrainConfig) -> str:
    """``auto``: the engine, unless the plugin keeps parameters it cannot read (``check_plugin``): then the HF loop.

    The engine is the faster one on CPU as well: the CI-sized tiny Llama's PPO rollouts took 0.02 s a step against
    0.15-0.74 s for the HF loop (4 steps of 4 prompts x 8 tokens, 2 shared cores), whose new shapes every step cost
    CPU kernels their set-up again; the engine decodes in fixed context buckets.
    """
    if opts.rollout_engine != "auto":
        return opts.rollout_engine
    try:
        check_plugin(train, "rollout")
    except ConfigError:
        return "hf"
    return "serving"


def check_plugin(train: TrainConfig, section: str) -> None:
    """Refuse plugins whose parameters the engine cannot read whole (see the module docstring)."""
    if train.plugin == "gemini":
        raise ConfigError(f"{section}.rollout_engine=serving: Gemini keeps the actor's parameters in chunks that "
                          f"are whole only inside its own forward, so the engine cannot read them; set "
                          f"{section}.rollout_engine=hf, or use train.plugin=zero2 (whole parameters, sharded "
                          f"optimizer states)")
    if train.plugin == "3d" and train.tp_size > 1:
        raise ConfigError(f"{section}.rollout_engine=serving: train.tp_size={train.tp_size} splits every "
                          f"projection over ranks and the engine runs whole layers; set {section}.rollout_engine=hf "
                          f"or train.tp_size=1 (zero_stage still shards the optimizer)")


def _timed_sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class HFRollout:
    """``ppo.sample`` through the (boosted) training model."""

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer: Any, eos_ids: list[int], device: torch.device):
        self.model, self.tokenizer, self.eos_ids, self.device = model, tokenizer, eos_ids, device
        self.timings = {"rollout_s": 0.0, "sync_s": 0.0}

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
                 greedy: bool = False, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from training.ppo import sample

        t0 = _timed_sync(self.device)
        out = sample(self.model, input_ids, attention_mask, gen, self.eos_ids, self.tokenizer.pad_token_id,
                     greedy=greedy, tokenizer=self.tokenizer)
        self.timings["rollout_s"] += _timed_sync(self.device) - t0
        return out

    def pop_timings(self) -> dict[str, float]:
        out, self.timings = self.timings, {"rollout_s": 0.0, "sync_s": 0.0}
        return out

    def close(self) -> None:
        pass


def hf_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a boosted (and maybe LoRA-wrapped) model: what the engine's runner reads."""
    if hasattr(model, "unwrap"):  # a booster's wrapper; keep PEFT's own model (ColossalAI wraps it for saving)
        try:
            model = model.unwrap(unwrap_peft=False)
        except TypeError:  # plugins whose unwrap takes no argument
            model = model.unwrap()
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA layers in place


class EngineRollout:
    """``serving.engine.LLMEngine`` over the actor (see the module docstring)."""

    name = "serving"

    def __init__(self, actor: nn.Module, tokenizer: Any, eos_ids: list[int], device: torch.device,
                 opts: RolloutOptions, compute_dtype: torch.dtype, max_prompt_len: int, max_new_tokens: int,
                 max_rows: int, block_size: int = 16):
        if max_rows > MAX_ENGINE_ROWS:
            raise ConfigError(f"rollout_batch_size: {max_rows} rows per rollout (x group_size for GRPO) exceed the "
                              f"engine's {MAX_ENGINE_ROWS} (serving.engine max_num_seqs); lower it or set "
                              "rollout_engine=hf")
        self.source = hf_causal_lm(actor)
        self.tokenizer, self.eos_ids, self.device = tokenizer, list(eos_ids), device
        dtype = next(self.source.parameters()).dtype
        self.weights = opts.rollout_weights if opts.rollout_weights != "auto" else (
            "shared" if dtype == compute_dtype else "copy")
        if self.weights == "copy":
            self.model = copy.deepcopy(self.source).to(dtype=compute_dtype).requires_grad_(False).eval()
        else:
            self.model = self.source
        self.max_len = max_prompt_len + max_new_tokens + 1  # the engine ends a row one short of its max_model_len
        self.max_rows = max_rows
        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        elem = torch.tensor([], dtype=compute_dtype if self.weights == "copy" else dtype).element_size()
        self.kv_bytes_per_token = cfg.num_hidden_layers * kv_heads * 2 * head_dim * elem
        row_tokens = -(-self.max_len // block_size) * block_size
        if opts.rollout_kv_cache_gb is None:
            tokens = max_rows * row_tokens
        else:
            tokens = int(opts.rollout_kv_cache_gb * 2**30) // self.kv_bytes_per_token
            if tokens < row_tokens:
                raise ConfigError(f"rollout_kv_cache_gb: {opts.rollout_kv_cache_gb} GB holds {tokens} tokens, less "
                                  f"than one row of {row_tokens} (data.max_length + max_new_tokens); raise it or "
                                  "leave it unset (one rollout's worth)")
        from serving.engine import EngineConfig

        # the whole rollout's prompts prefilled in one batched forward where they fit 8,192 padded tokens (the
        # engine's serving default, 256 a chunk, ran 32 eager forwards for the 1.1B bench's 16 prompts of ~260
        # tokens); at 8,192 tokens the MLP's intermediates there are ~0.3 GB (3 x 8,192 x 5,632 x 2 B)
        prefill = max(256, min(8192, max_rows * max_prompt_len))
        self.engine_config = EngineConfig(
            prefill_chunk=prefill, max_prefill_tokens=prefill,
            device="cuda" if device.type == "cuda" else "cpu", gpu_memory_gb=None, kv_cache_tokens=tokens,
            max_model_len=self.max_len, block_size=block_size,
            # prefix blocks hold K/V of the weights that computed them: stale after the next update
            enable_prefix_caching=False, max_num_seqs=min(max_rows, MAX_ENGINE_ROWS), max_waiting=max_rows,
            graph_batch_sizes=self.graph_batches(max_rows, opts.rollout_compile), compile=opts.rollout_compile,
            embed_on_host=False, lm_head_int8=False, fuse_projections=False, warmup=False,
            # rollout_overlap: the next decode step queued before the host has this one's tokens, stop checks and
            # bookkeeping while the GPU computes (rollouts ask for no logprobs; the plain step loop's answers)
            overlap_decode=opts.rollout_overlap)
        self.rebuilds = 0
        self.timings = {"rollout_s": 0.0, "sync_s": 0.0}
        self.engine = None
        self.info: dict[str, Any] = {}
        self._build()

    @staticmethod
    def graph_batches(max_rows: int, compiled: bool) -> list[int]:
        """CUDA-graph batch buckets. Compiled decode compiles its programs once per bucket, so then only 1, a
        quarter and all of the rollout's rows (its rows only ever finish, and a captured step costs nearly the same
        at any batch: 3.02 ms at 8 rows against 3.16 ms at 16 on the 1.1B shape, H200)."""
        if compiled:
            return sorted({1, max(1, max_rows // 4), max_rows})
        return sorted({*(b for b in GRAPH_BATCHES if b < max_rows), max_rows})

    def _pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _build(self) -> None:
        from serving.engine import LLMEngine

        t0 = time.perf_counter()
        self.engine = LLMEngine.from_model(self.model, self.tokenizer, self.engine_config, device=self.device)
        with torch.autocast(self.device.type, enabled=False):  # a rebuild inside the stage's autocast: graphs as built
            self.engine.load_and_start()
        # the stage's stop tokens exactly (ppo.sample's), not the engine's own reading of the model's configs
        self.engine.eos_ids = set(self.eos_ids)
        self._ptrs = self._pointers()
        self.info = {"weights": self.weights, "build_s": round(time.perf_counter() - t0, 2),
                     **{k: self.engine.info.get(k) for k in ("kv_cache_tokens", "kv_cache_bytes", "cuda_graphs",
                                                             "attention", "dtype", "max_model_len")}}
        logger.info("rollout engine: %s", self.info)

    def sync(self) -> None:
        """Copy mode: the actor's current parameters into the engine's copy, in place (graph addresses hold)."""
        if self.weights != "copy":
            return
        t0 = _timed_sync(self.device)
        with torch.no_grad():
            for dst, src in zip(self.model.parameters(), self.source.parameters(), strict=True):
                dst.copy_(src)
        self.timings["sync_s"] += _timed_sync(self.device) - t0

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
                 greedy: bool = False, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from serving.engine import SamplingParams

        self.sync()
        if self._pointers() != self._ptrs:  # a parameter was reallocated: graphs and views must be rebuilt
            logger.warning("rollout engine: the actor's parameters moved; rebuilding the engine")
            self.engine.shutdown()
            self.rebuilds += 1
            self._build()
        t0 = _timed_sync(self.device)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
        if len(rows) > self.max_rows:
            raise ValueError(f"{len(rows)} rows exceed the engine's {self.max_rows}")
        finished = threading.Event()
        lock = threading.Lock()
        left = [len(rows)]
        errors: list[BaseException] = []

        def sink(out: Any) -> None:
            if isinstance(out, BaseException) or out.finish_reason is not None:
                with lock:
                    if isinstance(out, BaseException):
                        errors.append(out)
                    left[0] -= 1
                    if left[0] == 0 or errors:
                        finished.set()

        params = [SamplingParams(
            max_tokens=gen.max_new_tokens, temperature=0.0 if greedy else gen.temperature,
            top_p=1.0 if greedy else gen.top_p, top_k=0 if greedy else gen.top_k,
            seed=None if greedy or seed is None else seed + i, stop=list(gen.stop),
            detokenize=False, final_only=True)  # ids only, one output per row: no per-token host work
            for i in range(len(rows))]
        # one inbox item: the scheduler's next step admits every row and prefills them in one forward
        seqs = self.engine.add_requests(rows, params, sink)
        while not finished.wait(5.0):
            if not self.engine.alive:
                raise RuntimeError(f"the rollout engine died: {self.engine.error}")
        if errors:
            raise errors[0]
        answers = [s.output_ids for s in seqs]
        width = max(len(a) for a in answers)
        pad = self.tokenizer.pad_token_id
        resp = torch.full((len(rows), width), pad, dtype=input_ids.dtype)
        resp_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
        for i, a in enumerate(answers):
            resp[i, :len(a)] = torch.tensor(a, dtype=input_ids.dtype)
            resp_mask[i, :len(a)] = 1
        out = (torch.cat([input_ids, resp.to(input_ids.device)], dim=1),
               torch.cat([attention_mask, resp_mask.to(attention_mask.device)], dim=1))
        self.timings["rollout_s"] += _timed_sync(self.device) - t0
        return out

    def pop_timings(self) -> dict[str, float]:
        out, self.timings = self.timings, {"rollout_s": 0.0, "sync_s": 0.0}
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class PhaseTimes:
    """Seconds per step of each phase (``rollout_s``, ``sync_s``, ``update_s``), averaged over the steps since the
    last ``report``: the side-by-side figures of ``training.bench`` (the update phase ends with a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, float] = {}
        self.steps = 0

    def now(self) -> float:
        return _timed_sync(self.device)

    def end_step(self, rollout: Rollout, update_start: float) -> None:
        for k, v in {**rollout.pop_timings(), "update_s": self.now() - update_start}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def report(self) -> dict[str, float]:
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return out


def make_rollout(opts: RolloutOptions, gen: GenerationConfig, section: str, train: TrainConfig, model: nn.Module,
                 tokenizer: Any, eos_ids: list[int], device: torch.device, max_prompt_len: int,
                 max_rows: int) -> Rollout:
    """The stage's rollout generator over ``model`` (the boosted actor) from ``{section}.rollout_*``."""
    from training.engine import compute_dtype

    if resolve_engine(opts, train) == "hf":
        return HFRollout(model, tokenizer, eos_ids, device)
    check_plugin(train, section)
    return EngineRollout(model, tokenizer, eos_ids, device, opts, compute_dtype(train, device), max_prompt_len,
                         gen.max_new_tokens, max_rows)
