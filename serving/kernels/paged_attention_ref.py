"""Torch paged attention: the reference the Triton kernel is tested against, and the CPU serving path.

Layout (docs: PAGED_INTERFACE, shared with ``serving/kv_cache.py``): per layer ``k_cache``/``v_cache``
``[num_blocks, kv_heads, block_size, head_dim]`` (fp, or int8 with ``k_scale``/``v_scale`` ``[num_blocks,
kv_heads, block_size, 1]`` in the model dtype), ``block_tables`` int32 ``[batch, max_blocks]``, ``context_lens``
int32 ``[batch]`` counting the token being decoded. Everything here is CUDA-graph safe: shapes follow the Python
ints ``max_context`` / ``start`` only, nothing reads a tensor value on the host.

Cache memory that no sequence owns is read by the gather (then masked): allocate caches with ``torch.zeros``
so it holds no NaN (a NaN there survives a zero softmax weight). The Triton kernel never loads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_int8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: (values, scale in ``dtype``); the same rule as ``serving.model``."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-6) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s.to(dtype)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
    """Store k/v ``[num_tokens, kv_heads, head_dim]`` at ``slot_mapping`` (int64, block * block_size + offset),
    quantizing to int8 when scales are given. Every slot must be valid: point padding rows at a scratch block."""
    block_size = k_cache.shape[2]
    blk, off = slot_mapping // block_size, slot_mapping % block_size
    if k_scale is not None:
        (k, ks), (v, vs) = quantize_int8(k, k_scale.dtype), quantize_int8(v, v_scale.dtype)
        k_scale[blk, :, off] = ks
        v_scale[blk, :, off] = vs
    k_cache[blk, :, off] = k.to(k_cache.dtype)
    v_cache[blk, :, off] = v.to(v_cache.dtype)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's Llama rotary embedding: ``x * cos + rotate_half(x) * sin`` over the last dim, in x's dtype."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None, slot_mapping: torch.Tensor) -> torch.Tensor:
    """``paged_attention.rope_write_kv`` in torch: q [n, heads*hd], k/v [n, kv_heads*hd], cos/sin [n, hd]."""
    n, kv_heads, head_dim = q.shape[0], k_cache.shape[1], k_cache.shape[3]
    c, s = cos.view(n, 1, head_dim), sin.view(n, 1, head_dim)
    q = rotate_half(q.view(n, -1, head_dim), c, s)
    k = rotate_half(k.reshape(n, kv_heads, head_dim), c, s)
    write_kv_ref(k, v.reshape(n, kv_heads, head_dim), k_cache, v_cache, k_scale, v_scale, slot_mapping)
    return q


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
              v_scale: torch.Tensor | None, block_tables: torch.Tensor, num_blocks: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_blocks`` blocks of each row of ``block_tables`` ``[batch, max_blocks]`` as dense
    ``[batch, kv_heads, num_blocks * block_size, head_dim]`` K and V in ``dtype`` (int8 dequantized)."""
    b = block_tables.shape[0]
    _, kv_heads, block_size, head_dim = k_cache.shape
    idx = block_tables[:, :num_blocks].reshape(-1).long()

    def one(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        x = cache.index_select(0, idx)  # [b*nb, kvh, bs, hd]
        x = x.to(dtype) * scale.index_select(0, idx) if scale is not None else x.to(dtype)
        # one copy into [b, kvh, nb*bs, hd]: SDPA wants each head's tokens contiguous
        return x.view(b, num_blocks, kv_heads, block_size, head_dim).transpose(1, 2).reshape(
            b, kv_heads, num_blocks * block_size, head_dim)

    return one(k_cache, k_scale), one(v_cache, v_scale)


def blocks_for(max_context: int, block_size: int, table_width: int) -> int:
    """Blocks a gather over ``max_context`` tokens needs, capped by the table width (no row holds more)."""
    if max_context < 1:
        raise ValueError(f"max_context must be >= 1, got {max_context}")
    return min(-(-max_context // block_size), table_width)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               max_context: int) -> torch.Tensor:
    """One new token per row: q ``[batch, num_heads, head_dim]`` attends over its row's first
    ``context_lens[i]`` cached tokens (``<= max_context``); -> ``[batch, num_heads, head_dim]`` in q's dtype.
    A row with context 0 (batch padding) gives zeros."""
    b, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    nb = blocks_for(max_context, block_size, block_tables.shape[1])
    kk, vv = gather_kv(k_cache, v_cache, k_scale, v_scale, block_tables, nb, q.dtype)
    lens = context_lens.to(torch.long)
    valid = torch.arange(nb * block_size, device=q.device)[None, :] < lens[:, None]  # [b, L]
    # the query heads of one kv head become that head's "query positions": K/V are never repeated per group
    qg = q.view(b, kv_heads, num_heads // kv_heads, head_dim)
    o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=valid.view(b, 1, 1, -1), scale=scale)
    o = torch.where((lens > 0).view(b, 1, 1, 1), o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.reshape(b, num_heads, head_dim)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                                block_table: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """One sequence's chunk: q ``[num_tokens, num_heads, head_dim]`` at positions ``start ..
    start + num_tokens - 1``, causal over cache positions ``0 .. start + num_tokens - 1`` (the chunk's own K/V
    already written); ``block_table`` int32 ``[max_blocks]``; -> ``[num_tokens, num_heads, head_dim]``."""
    t, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    end = start + t
    nb = -(-end // block_size)
    if nb > block_table.shape[0]:
        raise ValueError(f"prefill up to position {end} needs {nb} blocks, the table holds {block_table.shape[0]}")
    kk, vv = gather_kv(k_cache, v_cache, k_scale, v_scale, block_table.view(1, -1), nb, q.dtype)
    kk, vv = kk[0, :, :end], vv[0, :, :end]  # [kvh, end, hd]
    pos = torch.arange(start, end, device=q.device)
    causal = torch.arange(end, device=q.device)[None, :] <= pos[:, None]  # [t, end]
    # [t, nh, hd] -> [kvh, group * t, hd]: the group's queries share their kv head's K/V
    qg = q.view(t, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(kv_heads, group * t, head_dim)
    # 4-D so CUDA's fused SDPA kernels take it (3-D inputs fall back to the math path)
    o = F.scaled_dot_product_attention(qg[None], kk[None], vv[None], attn_mask=causal.repeat(group, 1)[None, None],
                                       scale=scale)
    return o.view(kv_heads, group, t, head_dim).permute(2, 0, 1, 3).reshape(t, num_heads, head_dim)
