"""Residual add + RMSNorm and the SiLU gate as one Triton launch each, for the prefill forward (decode runs the
same arithmetic as compiled pieces inside its CUDA graphs; prefill chunks change length, so they run these
instead of HF's modules: an RMSNorm module is ~8 eager kernels, rotate + K/V write ~30, the gate 2).

Both work row by row over the last dim of 2-D inputs (any row stride, contiguous last dim) and round as the torch
expressions they replace: ``h + d`` once, the normalized row to the activations' dtype before the weight, silu(g)
before ``* u``. ``backend="auto"``: Triton on CUDA, torch elsewhere; ``"triton"`` runs the kernel on any device
(interpreted on CPU under ``TRITON_INTERPRET=1``, as the no-vendor-BLAS path does).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "torch"]


def add_rms_norm_ref(h: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + d, RMSNorm(h + d) * w) as serving.runner's pieces and HF's LlamaRMSNorm compute them."""
    if d is not None:
        h = h + d
    hf = h.float()
    return h, w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _use_triton(x: torch.Tensor, backend: Backend) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def _rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D [rows, features] with a contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")


def add_rms_norm(h: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor, eps: float, *,
                 backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """h, d ``[rows, H]`` (d None: no add), w ``[H]`` -> (the residual h + d, its RMSNorm times w)."""
    if not _use_triton(h, backend):
        return add_rms_norm_ref(h, d, w, eps)
    _rows(h, "h")
    rows, hidden = h.shape
    if d is not None:
        _rows(d, "d")
        if d.shape != h.shape:
            raise ValueError(f"d must be {tuple(h.shape)}, got {tuple(d.shape)}")
    if w.shape != (hidden,):
        raise ValueError(f"w must be [{hidden}], got {tuple(w.shape)}")
    from serving.kernels._norm_act_triton import _add_rms_kernel

    h_out = torch.empty_like(h) if d is not None else h
    x = torch.empty(rows, hidden, dtype=torch.promote_types(w.dtype, h.dtype), device=h.device)
    dd = d if d is not None else h
    block = 1 << max(4, (hidden - 1).bit_length())
    _add_rms_kernel[(rows,)](h, dd, w.contiguous(), h_out, x, hidden, eps, h.stride(0), dd.stride(0),
                             h_out.stride(0), x.stride(0), HAS_D=d is not None, BLOCK=block,
                             num_warps=min(16, max(1, block // 256)))
    return h_out, x


def silu_mul(g: torch.Tensor, u: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """silu(g) * u for g, u ``[rows, N]`` (e.g. the two halves of a fused gate/up output)."""
    if not _use_triton(g, backend):
        return silu_mul_ref(g, u)
    _rows(g, "g")
    _rows(u, "u")
    if g.shape != u.shape:
        raise ValueError(f"g and u must have one shape, got {tuple(g.shape)} and {tuple(u.shape)}")
    from serving.kernels._norm_act_triton import _silu_mul_kernel

    rows, n = g.shape
    out = torch.empty(rows, n, dtype=g.dtype, device=g.device)
    block = 1024
    _silu_mul_kernel[(rows, -(-n // block))](g, u, out, n, g.stride(0), u.stride(0), out.stride(0), BLOCK=block,
                                            num_warps=4)
    return out


__all__ = ["add_rms_norm", "add_rms_norm_ref", "silu_mul", "silu_mul_ref"]
