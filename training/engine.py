"""Process group, ColossalAI booster, optimizer and scheduler: what a stage trains with.

One ``Trainable`` bundles a boosted model with its optimizer, scheduler and booster, so a
stage with two trained models (PPO's actor and critic) holds two of them.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.config import ConfigError, TrainConfig

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig) -> torch.device:
    """Join (or, run as a plain process, create) the process group and seed every RNG."""
    if "RANK" not in os.environ:  # single process: behave like torchrun with one worker
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    device = resolve_device(cfg)
    if device.type == "cpu" and cfg.plugin != "ddp":
        raise ConfigError(f"train.plugin: {cfg.plugin} needs CUDA; on CPU only 'ddp' runs")
    warnings.filterwarnings("ignore", message=".*apex.*")
    import colossalai

    if not dist.is_initialized():
        colossalai.launch_from_torch(seed=cfg.seed, verbose=False)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        if cfg.gpu_memory_limit_gb:
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_limit_gb / total), device)
    return device


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no GPU is visible")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor, device: torch.device) -> float:
    """Average a scalar (a number or a 0-d tensor) over ranks (metrics are reported for the whole job)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Activations' dtype: the configured precision on GPU, fp32 on CPU."""
    return _DTYPES[cfg.precision] if device.type == "cuda" else torch.float32


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the ddp plugin on GPU; the other plugins cast the model themselves."""
    if device.type == "cuda" and cfg.plugin == "ddp" and cfg.precision != "fp32":
        return torch.autocast("cuda", dtype=_DTYPES[cfg.precision])
    return contextlib.nullcontext()


def make_plugin(cfg: TrainConfig, *, grad_accum: bool = False) -> Any:
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    precision = "fp16" if cfg.precision == "fp16" else "bf16"
    if cfg.plugin == "ddp":
        return TorchDDPPlugin(find_unused_parameters=False)
    if cfg.plugin == "zero2":
        return LowLevelZeroPlugin(stage=2, precision=precision, max_norm=cfg.max_grad_norm)
    if cfg.plugin == "gemini":
        return GeminiPlugin(
            placement_policy=cfg.gemini_placement,
            precision=precision,
            max_norm=cfg.max_grad_norm,
            offload_optim_frac=cfg.gemini_offload_fraction if cfg.gemini_placement == "static" else 0.0,
            offload_param_frac=cfg.gemini_offload_param_fraction if cfg.gemini_placement == "static" else 0.0,
            enable_gradient_accumulation=grad_accum,
        )
    if cfg.pp_size > 1:
        raise ConfigError("train.pp_size > 1: pipeline parallelism is not supported by these stages; "
                          "use tp_size/zero_stage")
    return HybridParallelPlugin(
        tp_size=cfg.tp_size,
        pp_size=1,
        zero_stage=cfg.zero_stage,
        precision=precision,
        max_norm=cfg.max_grad_norm,
        enable_fused_normalization=False,
        custom_policy=decoder_tp_policy(),
    )


def decoder_tp_policy() -> Any:
    """A Shardformer policy for decoder-only models as transformers 5 writes them.

    ColossalAI 0.5.0's own Llama policy replaces model forwards written for transformers 4.51 and fails to import
    with transformers 5. This one only swaps linears: q/k/v/gate/up column-split, o/down row-split; embeddings and
    heads stay replicated. transformers 5's attention derives the local head count from the projection width, so no
    forward needs replacing, and the same policy serves causal LMs and value models.
    """
    from colossalai.shardformer.layer import Linear1D_Col, Linear1D_Row
    from colossalai.shardformer.policies.base_policy import (
        ModulePolicyDescription,
        Policy,
        SubModuleReplacementDescription,
    )

    class DecoderTPPolicy(Policy):
        def config_sanity_check(self) -> None:
            pass

        def preprocess(self) -> nn.Module:
            return self.model

        def postprocess(self) -> nn.Module:
            return self.model

        def module_policy(self) -> dict:
            if not self.shard_config.enable_tensor_parallelism:
                return {}
            tp, conf = self.shard_config.tensor_parallel_size, self.model.config
            kv_heads = getattr(conf, "num_key_value_heads", None) or conf.num_attention_heads
            if conf.num_attention_heads % tp or kv_heads % tp:
                raise ConfigError(f"train.tp_size: {tp} must divide the attention heads ({conf.num_attention_heads}) "
                                  f"and key/value heads ({kv_heads})")
            layers = getattr(self.model.base_model, "layers", None)
            if layers is None:
                raise ConfigError(f"train.plugin: 3d: {type(self.model).__name__} has no decoder layers to shard")
            cols = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
            rows = ("self_attn.o_proj", "mlp.down_proj")
            subs = [SubModuleReplacementDescription(suffix=name, target_module=Linear1D_Col) for name in cols]
            subs += [SubModuleReplacementDescription(suffix=name, target_module=Linear1D_Row) for name in rows]
            return {type(layers[0]): ModulePolicyDescription(sub_module_replacement=subs)}

    return DecoderTPPolicy()


def cosine_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class Trainable:
    """A boosted model with its optimizer, scheduler and booster."""

    name: str
    model: nn.Module
    optimizer: Any
    scheduler: Any
    booster: Any
    cfg: TrainConfig
    skipped_updates: int = 0  # updates step(skip_nonfinite=True) dropped for an inf/NaN gradient norm

    def unwrap(self) -> nn.Module:
        return self.model.unwrap() if hasattr(self.model, "unwrap") else self.model

    def backward(self, loss: torch.Tensor) -> None:
        self.booster.backward(loss, self.optimizer)

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-step (ddp)."""
        if last_micro_step or self.cfg.plugin != "ddp" or world_size() == 1:
            return contextlib.nullcontext()
        return self.booster.no_sync(self.model, self.optimizer)

    def step(self, skip_nonfinite: bool = False) -> float | torch.Tensor:
        """Clip, step, advance the schedule; returns the gradient norm before clipping.

        Under ddp the norm stays a device tensor (``float()`` it when logging), so the step never waits on the GPU.
        ``skip_nonfinite`` (ddp) reads the norm first and drops the update when it is inf or NaN, so one bad batch
        cannot poison the weights; the other plugins' mixed-precision optimizers skip such steps themselves.
        """
        grad_norm: float | torch.Tensor = float("nan")
        if self.cfg.plugin == "ddp":
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            if params:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
                if skip_nonfinite and not math.isfinite(float(grad_norm)):
                    self.skipped_updates += 1
                    self.optimizer.zero_grad()
                    self.scheduler.step()
                    return float(grad_norm)
        self.optimizer.step()
        if self.cfg.plugin != "ddp":
            norm = self.optimizer.get_grad_norm() if hasattr(self.optimizer, "get_grad_norm") else None
            grad_norm = float(norm) if norm is not None else float("nan")
        self.optimizer.zero_grad()
        self.scheduler.step()
        return grad_norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


def boost(name: str, model: nn.Module, cfg: TrainConfig, *, lr: float, total_steps: int,
          device: torch.device) -> Trainable:
    """Wrap ``model`` with a fresh booster and plugin (one per trained model, as Gemini requires)."""
    from colossalai.booster import Booster

    plugin = make_plugin(cfg, grad_accum=cfg.grad_accum_steps > 1)
    booster = Booster(plugin=plugin)
    if cfg.plugin == "ddp":
        model.to(device)
        if cfg.compile and device.type == "cuda":
            model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{name}: no trainable parameters (check model.lora)")
    if cfg.plugin == "ddp":
        optimizer: Any = torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                           fused=device.type == "cuda")
    else:
        from colossalai.nn.optimizer import HybridAdam

        optimizer = HybridAdam(params, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total_steps, cfg.warmup_steps,
                                                                           cfg.min_lr_ratio))
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    return Trainable(name, model, optimizer, scheduler, booster, cfg)


def frozen(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """An eval-mode, no-grad copy for the reference and reward models, in the compute dtype."""
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=compute_dtype(cfg, device))


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, w in zip(models, was, strict=False):
            m.train(w)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS on CPU)
