"""W8A16 linear for the int8 lm_head (``serving.model.Int8Linear``): int8 weight ``[N, K]`` with one scale per
output row, activations fp16/bf16 (fp32 under the interpreter), ``out = (x @ W.T) * scale``.

Why a kernel of our own: at the 4 GB profile the lm_head was the one fp16 GEMM left outside the GPTQ linears, and
its ``F.linear`` made the process create a cuBLAS handle. On the H200 (torch 2.11, 256-byte stack limit) the first
cuBLAS matmul adds 130 MiB to the process outside PyTorch's allocator (414 -> 544 MiB), kernel images that a
4 GiB card pays for in KV cache tokens (at 266,240 B a token, about 500 of them). The weight is read once per call
in int8 (half of fp16's bytes); only the rows that need logits (a decode batch, a prefill's last token) come in.

One program per (tile of ``BLOCK_N`` outputs, tile of ``BLOCK_M`` rows): ``tl.dot`` over K with the int8 weights
converted to the activations' dtype in registers (|q| <= 127 is exact in fp16/bf16), fp32 accumulation, the row
scale applied once at the end. Triton is imported at the first call (``_w8a16_triton``), so CPU serving without
the option needs no Triton, and ``TRITON_INTERPRET=1`` runs it on CPU tensors (the CI test).
"""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def w8a16_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ W.T) * scale`` in float32 (what the kernel is tested against)."""
    return (x.float() @ weight.float().t()) * scale.float()


def w8a16_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, block_n: int = 64,
                 block_k: int = 128, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x ``[..., K]`` (fp16/bf16/fp32), weight int8 ``[N, K]`` (contiguous), scale ``[N]`` -> ``[..., N]`` in x's
    dtype, through the Triton kernel (no cuBLAS)."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"weight must be a row-major int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k or x.dtype not in DTYPES:
        raise ValueError(f"x must be [..., {k}] in fp16/bf16/fp32, got {x.dtype} {tuple(x.shape)}")
    if scale.shape != (n,):
        raise ValueError(f"scale must be [{n}], got {tuple(scale.shape)}")
    from serving.kernels._w8a16_triton import launch

    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        launch(x2, weight, scale, out, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    return out.view(*x.shape[:-1], n)
