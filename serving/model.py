"""The model side of one replica: loading (HF or GPTQ through GPTQModel), weight layouts (int8 lm_head, fused
projections) and the int8 quantizer the KV cache uses. The forward over the paged cache and the CUDA graphs are
in ``serving.runner``; ``serving.engine`` schedules requests over it.

Imports only torch/transformers (+gptqmodel for GPTQ checkpoints)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import EngineError

logger = logging.getLogger("serving.model")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GIB = 1024**3


def _is_gptq(path: Path) -> bool:
    if (path / "quantize_config.json").is_file():
        return True
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    return q.get("quant_method") == "gptq"


def auto_gptq_backend(path: Path, device: torch.device) -> str:
    """torch on CPU; on CUDA Marlin where it applies (symmetric 4/8-bit), else ExLlamaV2 (4-bit, zero points too),
    else Triton."""
    if device.type != "cuda":
        return "torch"
    qfile = path / "quantize_config.json"
    q = json.loads(qfile.read_text()) if qfile.is_file() else \
        json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    bits, sym = q.get("bits", 4), q.get("sym", True)
    if sym and bits in (4, 8):
        return "marlin"
    return "exllama_v2" if bits == 4 else "triton"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EngineError("engine.device is cuda but CUDA is not available")
        dev = torch.device(device)
        # index 0 rather than torch.cuda.current_device(): that call starts CUDA, and the engine must set the
        # allocator config and the CUDA stack limit before CUDA starts
        return dev if dev.index is not None else torch.device("cuda", 0)
    return torch.device(device)


def host_module_names(path: Path, embed_on_host: bool, lm_head_quantized: bool) -> tuple[str, ...]:
    """Modules to load in host memory rather than on the device: the embedding when it will live on the host, the
    lm_head when it will be re-quantized from host memory anyway, neither when they are tied (one tensor). Loading
    them on the GPU first made the 4 GB replica's peak: on the H200 the 7B-shaped checkpoint read 4,108 MiB right
    after loading (both fp16 matrices, 250 MiB each, on the device) against 4,088 MiB at its busiest afterwards."""
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("tie_word_embeddings", False):
        return ()
    return tuple(n for n, on in (("model.embed_tokens", embed_on_host), ("lm_head", lm_head_quantized)) if on)


def _to_device_except(model: nn.Module, device: torch.device, host: tuple[str, ...]) -> nn.Module:
    """``model.to(device)`` for every parameter and buffer outside the ``host`` modules (left where they are)."""
    def on_host(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in host)
    for name, mod in model.named_modules():
        if on_host(name):
            continue
        for key, p in list(mod.named_parameters(recurse=False)):
            mod._parameters[key] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
        for key, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                mod._buffers[key] = b.to(device)
    return model


def _strip_dispatch_hooks(model: nn.Module) -> None:
    """A device_map with host entries may leave accelerate's dispatch hooks on modules; the runner calls the
    layers itself and moves tensors explicitly, so the hooks would only copy behind its back."""
    try:
        from accelerate.hooks import remove_hook_from_module
    except ImportError:
        return
    remove_hook_from_module(model, recurse=True)


def load_model(path: Path, device: torch.device, dtype: str = "auto", gptq_backend: str = "auto",
               host_modules: tuple[str, ...] = ()) -> tuple[nn.Module, bool]:
    """Load an HF causal LM (fp16/bf16/fp32) or a GPTQ checkpoint (GPTQModel kernels). Returns (model, is_gptq).
    ``host_modules`` (see ``host_module_names``) stay in host memory on a CUDA device."""
    cfg = json.loads((path / "config.json").read_text())
    host = tuple(host_modules) if device.type == "cuda" else ()
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"model type {cfg.get('model_type')!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    if _is_gptq(path):
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
        from gptqmodel import BACKEND, GPTQModel

        if gptq_backend == "auto":
            gptq_backend = auto_gptq_backend(path, device)
        # triton_gemv: GPTQModel's TORCH layers keep the standard tensors, repacked for serving.kernels below
        backend = {"marlin": BACKEND.MARLIN, "exllama_v2": BACKEND.EXLLAMA_V2, "triton": BACKEND.TRITON,
                   "torch": BACKEND.TORCH, "triton_gemv": BACKEND.TORCH}[gptq_backend]
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["dtype"] = torch.float16
        wrapped = None
        if host:
            try:
                wrapped = GPTQModel.load(str(path), backend=backend,
                                         device_map={"": str(device), **{h: "cpu" for h in host}}, **kwargs)
                _strip_dispatch_hooks(wrapped.model)
                # what the checkpoint does not hold (the rotary inv_freq buffer) is left on the CPU by such a load:
                # on the H200 the first prefill then failed with tensors on cuda:0 and cpu
                _to_device_except(wrapped.model, device, host)
            except Exception as e:  # noqa: BLE001 -- an older GPTQModel or no accelerate: the plain load, higher peak
                logger.warning("loading %s with %s in host memory failed (%s: %s); loading all of it on %s",
                               path, ", ".join(host), type(e).__name__, e, device)
                wrapped = None
                import gc

                gc.collect()
                torch.cuda.empty_cache()
        if wrapped is None:
            wrapped = GPTQModel.load(str(path), backend=backend, device=str(device), **kwargs)
        model = wrapped.model
        if gptq_backend == "triton_gemv":
            from serving.quant_linear import swap_gptq_linears

            swap_gptq_linears(model)
        return model.eval(), True
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, low_cpu_mem_usage=True)
    return _to_device_except(model, device, host).eval(), False


class Int8Linear(nn.Module):
    """Weight-only int8 linear with per-row scales. ``use_kernel``: the Triton W8A16 kernel
    (``serving.kernels.w8a16``: no cuBLAS, no fp16 temporary); else dequantized 1024 rows at a time into
    ``F.linear``: at hidden 4096 the fp16 temporary is 8 MiB, held by both the activation reserve and the CUDA graph
    pool of a 4 GiB replica."""

    def __init__(self, weight: torch.Tensor, chunk: int = 1024):
        super().__init__()
        w = weight.detach().to("cpu", torch.float32)  # quantize in host memory: no fp32 copy on the GPU
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8).to(weight.device))
        self.register_buffer("scale", scale.squeeze(1).to(weight.dtype).to(weight.device))
        self.chunk = chunk
        self.out_features = weight.shape[0]
        self.use_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            from serving.kernels.w8a16 import w8a16_linear

            return w8a16_linear(x, self.weight, self.scale)
        step = self.chunk
        parts = [F.linear(x, self.weight[s:s + step].to(x.dtype)) for s in range(0, self.out_features, step)]
        return torch.cat(parts, dim=-1) * self.scale


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)`` with one GEMM: plain ``nn.Linear`` (weights
    concatenated), GPTQModel's Marlin layers (Marlin's layout tiles the output dimension in 64-column blocks,
    so the repacked weights and permuted scales concatenate along it) or ``W4A16Linear`` (triton_gemv). None when
    the modules do not qualify.
    The result is checked against the separate modules on a random input; a mismatch also gives None."""
    m0 = mods[0]
    if all(type(m) is nn.Linear for m in mods):
        if len({(m.in_features, m.weight.dtype, m.bias is None) for m in mods}) != 1:
            return None
        fused = nn.Linear(m0.in_features, sum(m.out_features for m in mods), bias=m0.bias is not None,
                          device=m0.weight.device, dtype=m0.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in mods]))
            if m0.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in mods]))
    elif type(m0).__name__ in ("MarlinLinear", "MarlinQuantLinear"):
        keys = ("in_features", "bits", "group_size", "desc_act", "sym")
        if any(type(m) is not type(m0) or getattr(m, "bias", None) is not None or m.out_features % 64
               or getattr(m, "_marlin_tile_padding", None) is not None or getattr(m, "desc_act", False)
               or getattr(m, "adapter", None) is not None
               or any(getattr(m, k, None) != getattr(m0, k, None) for k in keys) for m in mods):
            return None
        import copy

        fused = copy.copy(m0)
        fused._parameters, fused._buffers, fused._modules = dict(m0._parameters), dict(m0._buffers), {}
        for name in ("qweight", "scales"):
            t = torch.cat([getattr(m, name).data for m in mods], dim=1)
            if name in fused._parameters:
                fused._parameters[name] = nn.Parameter(t, requires_grad=False)
            elif name in fused._buffers:
                fused._buffers[name] = t
            else:
                fused.__dict__[name] = t
        fused.out_features = sum(m.out_features for m in mods)
    elif type(m0).__name__ == "W4A16Linear":  # gptq_backend triton_gemv: the kernel's layout concatenates along N
        from serving.kernels.w4a16 import KernelError

        try:
            fused = type(m0).fuse(mods)
        except KernelError as e:
            logger.warning("W4A16 projections kept separate: %s", e)
            return None
    else:
        return None
    with torch.inference_mode():
        dev = next(iter([*m0.parameters(), *m0.buffers()])).device
        dtype = m0.weight.dtype if isinstance(m0, nn.Linear) else torch.float16
        x = torch.randn(3, m0.in_features, device=dev, dtype=dtype,
                        generator=torch.Generator(device=dev).manual_seed(0))
        ref = torch.cat([m(x) for m in mods], dim=-1).float()
        err = (fused(x).float() - ref).abs().max().item()
    if not err <= 0.02 * ref.abs().max().item() + 1e-3:
        logger.warning("fusing %s projections changed their output (max error %.3g): kept separate",
                       type(m0).__name__, err)
        return None
    return fused


def quantize_int8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: (values, scale in ``dtype``)."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-6) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s.to(dtype)
