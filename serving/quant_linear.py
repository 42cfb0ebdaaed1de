"""GPTQ 4-bit linears on this project's own Triton kernels (``serving.kernels.w4a16``), swapped in after
GPTQModel has loaded a checkpoint (``engine.gptq_backend: triton_gemv``).

GPTQModel loads with its TORCH backend, which keeps the standard GPTQ tensors; ``swap_gptq_linears`` repacks
each 4-bit layer once into the kernel's layout, frees GPTQModel's copy and shares one split-K workspace
across all layers. 1..8 rows (decode) run the split-K GEMV with the tuned config for their (shape, row
bucket); longer inputs (prefill) take the Triton GEMM (``serving.kernels.w4a16_gemm``: dequantized tile by tile
in registers, tensor cores), so a model on these kernels never creates a cuBLAS handle for its GPTQ layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from serving.kernels import w4a16, w4a16_gemm
from serving.kernels.w4a16 import GemvConfig, KernelError, PackedW4, SplitKWorkspace

logger = logging.getLogger("serving.quant_linear")


class W4A16Linear(nn.Module):
    """``y = x @ W + b`` for a (possibly fused) GPTQ 4-bit weight held in ``PackedW4`` layout."""

    def __init__(self, packed: PackedW4, bias: torch.Tensor | None = None,
                 configs: dict[str, GemvConfig] | None = None, workspace: SplitKWorkspace | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = packed.in_features, packed.out_features, \
            packed.group_size
        self.register_buffer("weight_packed", packed.weight)
        self.register_buffer("scale_zero", packed.scale_zero)
        self.register_buffer("perm", packed.perm)
        self.register_buffer("bias", bias)
        self.configs = configs if configs is not None else {}
        self.workspace = workspace
        self._picked: dict[int, GemvConfig] = {}
        self.gemm_block_n = 64  # outputs per program of the prefill GEMM

    @classmethod
    def from_tensors(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor | None, group_size: int, bias: torch.Tensor | None = None,
                     zero_offset: int = 1, **kwargs) -> W4A16Linear:
        """From standard GPTQ tensors (``zero_offset`` 1: v1 on-disk zero points, 0: GPTQModel's v2)."""
        packed = w4a16.repack(qweight, qzeros, scales, g_idx, group_size, zero_offset)
        return cls(packed, None if bias is None else bias.detach().to(torch.float16), **kwargs)

    @classmethod
    def from_gptq_module(cls, m: nn.Module, **kwargs) -> W4A16Linear:
        """From a loaded GPTQModel QuantLinear that keeps the standard tensors (its TORCH backend)."""
        if getattr(m, "bits", 4) != 4:
            raise KernelError(f"{type(m).__name__} has {m.bits}-bit weights; the kernel takes 4-bit only")
        if type(m).__name__.startswith(("Marlin", "ExllamaV2", "Machete")):
            raise KernelError(f"{type(m).__name__} has repacked its weights; load with the TORCH backend")
        fmt = m.qzero_format() if hasattr(m, "qzero_format") else 1
        return cls.from_tensors(m.qweight, m.qzeros, m.scales, getattr(m, "g_idx", None), int(m.group_size),
                                getattr(m, "bias", None), zero_offset=1 if fmt == 1 else 0, **kwargs)

    @classmethod
    def fuse(cls, mods: list[W4A16Linear]) -> W4A16Linear:
        """One GEMV over several layers' weights (q/k/v, gate/up): the outputs side by side."""
        if any(m.bias is not None for m in mods) and not all(m.bias is not None for m in mods):
            raise KernelError("fused layers must all have a bias or none")
        packed = w4a16.concat([m.packed for m in mods])
        ws = mods[0].workspace
        if ws is not None and packed.out_features > ws.max_out:
            raise KernelError(f"the shared split-K workspace holds {ws.max_out} outputs, the fused layer has "
                              f"{packed.out_features}")
        bias = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
        return cls(packed, bias, configs=mods[0].configs, workspace=mods[0].workspace)

    @property
    def packed(self) -> PackedW4:
        return PackedW4(self.weight_packed, self.scale_zero, self.perm, self.in_features, self.out_features,
                        self.group_size)

    def config_for(self, m: int) -> GemvConfig:
        b = w4a16.bucket(m)
        cfg = self._picked.get(b)
        if cfg is None:
            cfg = self.configs.get(w4a16.config_key(self.out_features, self.in_features, b)) or \
                w4a16.default_config(self.out_features, self.in_features, b)
            self._picked[b] = cfg
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" and not w4a16.interpreting():
            raise KernelError("the triton_gemv kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if m <= w4a16.MAX_ROWS:
            cfg = self.config_for(m)
            if cfg.split_k > 1 and self.workspace is None:
                # standalone layer (tests, benchmarks); a model's layers share the one swap_gptq_linears made
                self.workspace = SplitKWorkspace(x.device, self.out_features)
            y = w4a16.gemv(x2, self.packed, cfg, self.workspace)
        else:
            y = w4a16_gemm.matmul(x2, self.packed, self.gemm_block_n)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, " \
               f"act_order={self.perm is not None}"


def _is_gptq_linear(m: nn.Module) -> bool:
    return all(hasattr(m, n) for n in ("qweight", "qzeros", "scales")) and not isinstance(m, W4A16Linear)


def swap_gptq_linears(model: nn.Module, config_table: str | Path | None = None) -> dict[str, int]:
    """Replace every 4-bit GPTQ linear of ``model`` by a ``W4A16Linear`` (in place). Layers the kernel cannot
    take keep GPTQModel's module (logged). Returns counts: swapped, kept."""
    configs = w4a16.load_config_table(config_table)
    dev = next(iter(model.buffers()), torch.empty(0)).device
    if dev.type != "cuda" and not w4a16.interpreting():
        raise KernelError("gptq_backend triton_gemv runs on CUDA (on a CPU only under TRITON_INTERPRET=1, for tests)")
    # names only: holding the modules would keep every old weight alive until the end (2x the weights at peak;
    # one layer at a time, GPTQModel's copy is freed as soon as its replacement is in place)
    names = [name for name, m in model.named_modules() if _is_gptq_linear(m)]
    swapped: list[W4A16Linear] = []
    kept = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            new = W4A16Linear.from_gptq_module(getattr(parent, child), configs=configs)
        except KernelError as e:
            logger.warning("%s stays on GPTQModel's kernel: %s", name, e)
            kept += 1
            continue
        setattr(parent, child, new)
        swapped.append(new)
    if swapped:
        dev = swapped[0].weight_packed.device
        # twice the widest layer, so fused q/k/v (3 x 4096 at 7B) and gate/up (2 x 11008) fit too: 11 MiB at 7B
        workspace = SplitKWorkspace(dev, 2 * max(m.out_features for m in swapped))
        for m in swapped:
            m.workspace = workspace
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    logger.info("triton_gemv: %d GPTQ linears swapped, %d kept (%d tuned configs)", len(swapped), kept,
                len(configs))
    return {"swapped": len(swapped), "kept": kept}
