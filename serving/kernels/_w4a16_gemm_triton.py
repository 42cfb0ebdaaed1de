"""The prefill GEMM of ``serving.kernels.w4a16_gemm`` as a plain function (wrapped with ``triton.jit`` at first
use). Layout: ``serving.kernels.w4a16``'s docstring. Only builtins of triton.language (see _w4a16_triton)."""

import triton.language as tl


def w4a16_gemm_kernel(x_ptr, w_ptr, sz_ptr, perm_ptr, out_ptr, M, N, K, K8, chunks_per_group, stride_xm, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_J: tl.constexpr, HAS_PERM: tl.constexpr):
    """out[m tile, n tile] = x @ W: per 256-input chunk, 32 words of each output row are loaded once and unpacked
    nibble by nibble into a [32, BLOCK_N] tile of ``(q - z) * s`` in x's dtype, which ``tl.dot`` multiplies with
    the matching 32 activations of every row of the M tile (tensor cores; fp32 accumulation)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_i = tl.arange(0, 32)
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K8 + offs_i[:, None]  # [32, BLOCK_N]: word i of each row
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for c in range(0, K8 // 32):
        w = tl.load(w_ptrs + c * 32, mask=n_ok[None, :], other=0)
        for j in tl.static_range(8):
            if j % GROUP_J == 0:
                if GROUP_J < 8:
                    g = c * (8 // GROUP_J) + j // GROUP_J
                else:
                    g = c // chunks_per_group
                sz = sz_ptr + (g * N + offs_n) * 2
                s = tl.load(sz, mask=n_ok, other=0.0).to(tl.float32)
                z = tl.load(sz + 1, mask=n_ok, other=0.0).to(tl.float32)
            q = ((w >> (4 * j)) & 15).to(tl.float32)
            wq = ((q - z[None, :]) * s[None, :]).to(x_ptr.dtype.element_ty)  # [32, BLOCK_N]
            kk = c * 256 + 32 * j + offs_i
            if HAS_PERM:
                kx = tl.load(perm_ptr + kk)
            else:
                kx = kk
            xt = tl.load(x_rows + kx[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)  # [BLOCK_M, 32]
            acc = tl.dot(xt, wq, acc)
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
