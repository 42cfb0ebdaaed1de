"""The Triton kernel of ``serving.kernels.w8a16`` (imports triton: imported at the first call only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # tl.dot takes at least 16 rows: a decode batch of 1..16 is one row tile (rows past M masked)


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BLOCK_K, BLOCK_N]
        if IEEE:  # fp32 activations (the interpreter, tests): no tf32 rounding
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    out = acc * s[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *, block_n: int,
           block_k: int, num_warps: int, num_stages: int) -> None:
    m, k = x.shape
    n = weight.shape[0]
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _w8a16_kernel[grid](x, weight, scale, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
                        num_warps=num_warps, num_stages=num_stages)
