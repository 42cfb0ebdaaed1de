"""Triton paged decode attention (flash-decoding over block tables) and the paged K/V write.

Imported only when the Triton path is taken (``serving.kernels.paged_attention`` imports it lazily), so CPU
serving needs no Triton. ``TRITON_INTERPRET=1`` must be set before the first import to run it on CPU tensors.

One program per (row, kv head, split of the context): it loads the query heads of its kv head (GQA: K/V read
once for the whole group, padded to 16 rows for ``tl.dot``; a single head may take multiply-adds instead,
``DecodeConfig.use_dot``), walks its split's tokens ``BLOCK_N`` at a time
through the block table, dequantizes int8 K/V in registers (the per-token scale multiplies the scores and the
probabilities, so the int8 values go to the dot unscaled), and keeps an online softmax. With one split it
writes the output directly; otherwise each split writes its (max, sum, unnormalized output) and a second kernel
merges the splits. The grid depends only on batch, kv heads and the split count (from the Python int
``max_context``), so the launch can live inside a CUDA graph.

``write_kv_triton`` stores one step's K/V (int8-quantized exactly as ``quantize_int8``) in one launch;
``rope_write_kv_triton`` also applies the rotary embedding to the step's queries and keys in that launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from serving.kernels.paged_attention_tuning import MAX_FMA_GROUP, DecodeConfig, split_plan

LOG2E = 1.4426950408889634
MIN_GROUP_ROWS = 16  # tl.dot needs at least 16 rows; a group of 1..16 query heads is padded to this
# without tl.dot a [group, block_n, head_dim] product lives in registers: only MHA may (MAX_FMA_GROUP)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                  qk_scale, tokens_per_split, num_splits,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_sb, stride_sh, stride_st,
                  stride_btb, stride_ob, stride_oh,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, INT8: tl.constexpr, DIRECT: tl.constexpr, USE_DOT: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = sp * tokens_per_split
    end = tl.minimum(ctx, start + tokens_per_split)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    kv_base = kvh * stride_kh
    s_base = kvh * stride_sh
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        tmask = tok < end
        phys = tl.load(bt_ptr + b * stride_btb + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = tok % BLOCK_SIZE
        row = phys * stride_kb + kv_base + off * stride_kt
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        if INT8:
            srow = phys * stride_sb + s_base + off * stride_st
            ks = tl.load(ks_ptr + srow, mask=tmask, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + srow, mask=tmask, other=0.0).to(tl.float32)
            k = k.to(q.dtype)  # |int8| <= 127: exact in fp16 and bf16
            v = v.to(q.dtype)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_G, BLOCK_N] fp32
        else:  # one query head: multiply-add over head_dim, no padding to 16 rows
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), 2)
        if INT8:
            s = s * ks[None, :]
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))  # log2 domain
        # the loop only visits tiles holding a token, so m_new is finite and the exponents are well defined
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        if INT8:
            p = p * vs[None, :]
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), 1)
        m = m_new

    if DIRECT:
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # context 0 (padding row): zeros
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        # partials [batch, num_heads, num_splits(, head_dim)], contiguous
        ph = (b * (tl.num_programs(1) * GROUP) + heads) * num_splits + sp
        tl.store(pm_ptr + ph, m, mask=gmask)
        tl.store(pl_ptr + ph, l_sum, mask=gmask)
        tl.store(po_ptr + ph[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _reduce_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    smask = s < num_splits
    base = (b * tl.num_programs(1) + h) * num_splits
    m = tl.load(pm_ptr + base + s, mask=smask, other=float("-inf"))
    l_sum = tl.load(pl_ptr + base + s, mask=smask, other=0.0)
    po = tl.load(po_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # every split empty (context 0): weights 0, out 0
    w = tl.math.exp2(m - m_all)
    total = tl.sum(w * l_sum, 0)
    o = tl.sum(w[:, None] * po, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  max_context: int, config: DecodeConfig) -> torch.Tensor:
    """The Triton decode; arguments as ``paged_decode_attention_ref`` (checked by the caller)."""
    b, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    max_context = min(max_context, block_tables.shape[1] * block_size)
    per, splits = split_plan(max_context, config)
    use_dot = config.use_dot or group > MAX_FMA_GROUP
    out = torch.empty_like(q)
    int8 = k_scale is not None
    ks, vs = (k_scale, v_scale) if int8 else (k_cache, v_cache)  # unused pointers when not int8
    sst = (ks.stride(0), ks.stride(1), ks.stride(2)) if int8 else (0, 0, 0)
    direct = splits == 1
    if direct:
        po = pm = pl = out
    else:
        po = torch.empty((b, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        pm = torch.empty((b, num_heads, splits), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    _split_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, context_lens, out, po, pm, pl,
        scale * LOG2E, per, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *sst,
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(MIN_GROUP_ROWS if use_dot else 1, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=config.block_n, INT8=int8, DIRECT=direct, USE_DOT=use_dot,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if not direct:
        _reduce_kernel[(b, num_heads)](po, pm, pl, out, splits, out.stride(0), out.stride(1),
                                       HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct,
                     stride_sb, stride_sh, stride_st,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, INT8: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d)
    _store_kv(k, v, kc_ptr, vc_ptr, ks_ptr, vs_ptr, tl.load(slot_ptr + t), h, d, stride_cb, stride_ch, stride_ct,
              stride_sb, stride_sh, stride_st, BLOCK_SIZE, INT8)


@triton.jit
def _store_kv(k, v, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot, kvh, d, stride_cb, stride_ch, stride_ct,
              stride_sb, stride_sh, stride_st, BLOCK_SIZE: tl.constexpr, INT8: tl.constexpr):
    """One token's K and V of kv head ``kvh`` stored at cache ``slot`` (int8 with a scale when INT8)."""
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    dst = blk * stride_cb + kvh * stride_ch + off * stride_ct + d
    if INT8:
        sdst = blk * stride_sb + kvh * stride_sh + off * stride_st
        _store_int8(k, kc_ptr + dst, ks_ptr + sdst)
        _store_int8(v, vc_ptr + dst, vs_ptr + sdst)
    else:
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty))
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty))


@triton.jit
def _store_int8(x, dst, sdst):
    """``quantize_int8`` bit for bit: fp32 scale amax/127 (at least 1e-6/127), IEEE division, ties to even."""
    xf = x.to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(xf), 0), 1e-6) / 127.0
    y = tl.math.div_rn(xf, s)
    r = tl.math.floor(y + 0.5)
    odd = (r - 2.0 * tl.math.floor(r * 0.5)) != 0.0
    r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(dst, r.to(tl.int8))
    tl.store(sdst, s.to(sdst.dtype.element_ty))


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                       stride_qt, stride_kt, stride_vt, stride_ct, stride_ot,
                       stride_cb, stride_ch, stride_cs, stride_sb, stride_sh, stride_ss,
                       N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, INT8: tl.constexpr):
    """Program (t, h): h < N_HEADS rotates query head h into qo; else kv head h - N_HEADS: its key rotated, then
    both K and V stored at the token's slot (int8 with a scale when INT8)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    half = HEAD_DIM // 2
    partner = (d + half) % HEAD_DIM  # rotate_half: [-x2, x1]
    sign = tl.where(d < half, -1.0, 1.0)
    c = tl.load(cos_ptr + t * stride_ct + d).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + d).to(tl.float32)
    if h < N_HEADS:
        row = q_ptr + t * stride_qt + h * HEAD_DIM
        x = tl.load(row + d).to(tl.float32)
        xr = tl.load(row + partner).to(tl.float32) * sign
        tl.store(qo_ptr + t * stride_ot + h * HEAD_DIM + d, (x * c + xr * s).to(qo_ptr.dtype.element_ty))
    else:
        kvh = h - N_HEADS
        row = k_ptr + t * stride_kt + kvh * HEAD_DIM
        x = tl.load(row + d).to(tl.float32)
        xr = tl.load(row + partner).to(tl.float32) * sign
        k = (x * c + xr * s).to(k_ptr.dtype.element_ty)  # rounded to the activations' dtype, as the torch path
        v = tl.load(v_ptr + t * stride_vt + kvh * HEAD_DIM + d)
        _store_kv(k, v, kc_ptr, vc_ptr, ks_ptr, vs_ptr, tl.load(slot_ptr + t), kvh, d, stride_cb, stride_ch,
                  stride_cs, stride_sb, stride_sh, stride_ss, BLOCK_SIZE, INT8)


def rope_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                         v_scale: torch.Tensor | None, slot_mapping: torch.Tensor) -> torch.Tensor:
    """One launch for a decode step's rotary and K/V write: q [n, nh*hd], k/v [n, kvh*hd] (rows contiguous
    per head), cos/sin [n, hd]; returns the rotated q [n, nh, hd]."""
    n = q.shape[0]
    _, kv_heads, block_size, head_dim = k_cache.shape
    n_heads = q.shape[1] // head_dim
    q_out = torch.empty(n, n_heads, head_dim, dtype=q.dtype, device=q.device)
    int8 = k_scale is not None
    ks, vs = (k_scale, v_scale) if int8 else (k_cache, v_cache)
    sst = (ks.stride(0), ks.stride(1), ks.stride(2)) if int8 else (0, 0, 0)
    _rope_write_kernel[(n, n_heads + kv_heads)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, ks, vs, slot_mapping,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), q_out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *sst,
        N_HEADS=n_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, INT8=int8, num_warps=1)
    return q_out


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
    """One program per (token, kv head): the write (and int8 quantization) of K and V in one launch, where the
    torch path takes two index_puts plus the quantization's element-wise kernels."""
    n, kv_heads, head_dim = k.shape
    int8 = k_scale is not None
    ks, vs = (k_scale, v_scale) if int8 else (k_cache, v_cache)
    sst = (ks.stride(0), ks.stride(1), ks.stride(2)) if int8 else (0, 0, 0)
    _write_kv_kernel[(n, kv_heads)](
        k, v, k_cache, v_cache, ks, vs, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *sst, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2], INT8=int8, num_warps=1)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, out_ptr, qk_scale, start, num_tokens,
                    stride_qt, stride_qh, stride_kb, stride_kh, stride_kt, stride_sb, stride_sh, stride_st,
                    stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, INT8: tl.constexpr, IEEE: tl.constexpr):
    mt = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < num_tokens
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=r_ok[:, None], other=0.0)
    # rows past the chunk act as its last row (a finite softmax) and are never stored
    qpos = start + tl.minimum(rows, num_tokens - 1)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kend = start + tl.minimum(mt * BLOCK_M + BLOCK_M, num_tokens)  # the tile's last row sees up to here
    for t0 in range(0, kend, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        tmask = tok < kend
        phys = tl.load(bt_ptr + tok // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        off = tok % BLOCK_SIZE
        row = phys * stride_kb + kvh * stride_kh + off * stride_kt
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        if INT8:
            srow = phys * stride_sb + kvh * stride_sh + off * stride_st
            ks = tl.load(ks_ptr + srow, mask=tmask, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + srow, mask=tmask, other=0.0).to(tl.float32)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if INT8:
            s = s * ks[None, :]
        visible = (tok[None, :] <= qpos[:, None]) & tmask[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        # position 0 is in the first tile and visible to every row: m is finite from the first tile on
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        if INT8:
            p = p * vs[None, :]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    o = acc / l_sum[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None])


def paged_prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                                   block_table: torch.Tensor, start: int, scale: float, block_m: int = 32,
                                   block_n: int = 64) -> torch.Tensor:
    """One sequence's chunk, as ``paged_prefill_attention_ref`` (checked by the caller): one program per
    (``block_m`` query tokens, query head), flash attention over the chunk's blocks with the causal mask, K/V read
    in place through ``block_table`` (int8 dequantized in registers as in the decode kernel). No SDPA, no cuBLAS."""
    t, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    int8 = k_scale is not None
    ks, vs = (k_scale, v_scale) if int8 else (k_cache, v_cache)
    sst = (ks.stride(0), ks.stride(1), ks.stride(2)) if int8 else (0, 0, 0)
    _prefill_kernel[(triton.cdiv(t, block_m), num_heads)](
        q, k_cache, v_cache, ks, vs, block_table, out, scale * LOG2E, start, t,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *sst,
        out.stride(0), out.stride(1),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        INT8=int8, IEEE=q.dtype == torch.float32, num_warps=4)
    return out
