"""W4A16 GEMM for prefill (more than ``w4a16.MAX_ROWS`` rows) on the ``PackedW4`` layout, in Triton: the weight
is dequantized tile by tile in registers and multiplied on tensor cores, so no fp16 copy of the weight is
written and no cuBLAS handle is created. cuBLAS's handle, workspace and kernel images are ~130 MiB of device
memory outside PyTorch's allocator on the H200 (../shared/docs/environment.md: 414 -> 544 MiB for the first
fp16 matmul), a third of what the 4 GB replica's KV cache gets; with this kernel and the GEMV every GEMM of a
GPTQ model runs on the project's own kernels."""

from __future__ import annotations

import torch

from serving.kernels.w4a16 import KernelError, PackedW4, _chunks_per_group, _group_j, _jitted, interpreting


def block_m_for(m: int) -> int:
    """16 rows up to 16, then 32, 64 (a prefill chunk of 128 runs as two M tiles of 64: the weight is read
    twice, still far less than the dequantize path's write and read of a full fp16 copy)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def matmul(x: torch.Tensor, packed: PackedW4, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W`` -> [M, N] in x's dtype, for any M (meant for M > 8; decode takes ``w4a16.gemv``)."""
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise KernelError(f"input {tuple(x.shape)} does not match the layer's {packed.in_features} features")
    if x.device.type != "cuda" and not interpreting():
        raise KernelError("the W4A16 GEMM needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    m, k = x.shape
    n = packed.out_features
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm = block_m_for(m)
    perm = packed.perm if packed.perm is not None else packed.weight
    _jitted("gemm")[(-(-n // block_n), -(-m // bm))](
        x, packed.weight, packed.scale_zero, perm, out, m, n, k, packed.weight.shape[1],
        _chunks_per_group(packed.group_size), x.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=block_n, GROUP_J=_group_j(packed.group_size), HAS_PERM=packed.perm is not None,
        num_warps=num_warps, num_stages=num_stages)
    return out


__all__ = ["block_m_for", "matmul"]
