"""The Triton kernels of ``serving.kernels.norm_act`` (imports triton: imported at the first call only)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_rms_kernel(h_ptr, d_ptr, w_ptr, hout_ptr, x_ptr, H, eps, stride_h, stride_d, stride_ho, stride_x,
                    HAS_D: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: (h + d) stored as the new residual (HAS_D), then RMSNorm of it times w, rounded as torch does."""
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    h = tl.load(h_ptr + r * stride_h + offs, mask=ok, other=0.0)
    if HAS_D:
        d = tl.load(d_ptr + r * stride_d + offs, mask=ok, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(h_ptr.dtype.element_ty)  # torch's h + d: one rounding
        tl.store(hout_ptr + r * stride_ho + offs, h, mask=ok)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / H
    n = (hf * (1.0 / tl.sqrt(var + eps))).to(h_ptr.dtype.element_ty)  # normalized, in the activations' dtype
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(x_ptr + r * stride_x + offs, (w.to(tl.float32) * n.to(tl.float32)).to(x_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    """Row r, columns of block c: silu(g) rounded to the activations' dtype, times u (torch's F.silu(g) * u)."""
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(g_ptr + r * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_u + offs, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r * stride_o + offs, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=ok)
