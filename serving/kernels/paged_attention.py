"""Paged attention for the serving engine: decode and chunked prefill reading K/V through block tables.

The layout and the three functions are the contract in PAGED_INTERFACE (cache ``[num_blocks, kv_heads,
block_size, head_dim]``, int8 with per (token, kv head) scales, int32 block tables and context lengths).
``paged_decode_attention`` runs the Triton flash-decoding kernel (``paged_attention_triton``) on CUDA for fp16
and bf16 queries, and the torch gather + SDPA reference (``paged_attention_ref``) everywhere else: CPU serving,
fp32, or ``backend="torch"``. ``write_kv`` is one Triton launch on CUDA (torch index_put elsewhere), and
``rope_write_kv`` (decode's rotary embedding of q and k, then the K/V write) too;
``paged_prefill_attention`` is torch by default on every device (graph safe; it runs once per chunk, outside the
decode graphs), or a Triton flash-attention kernel over blocks with ``backend="triton"``. Nothing is imported or
probed at import time: Triton is imported at the first Triton call.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

from serving.kernels.paged_attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    rope_write_kv_ref,
    write_kv_ref,
)
from serving.kernels.paged_attention_tuning import DecodeConfig, DecodeTuning, default_config, packaged_tuning

__all__ = ["DecodeConfig", "DecodeTuning", "paged_decode_attention", "paged_prefill_attention", "rope_write_kv",
           "write_kv", "triton_supports"]

Backend = Literal["auto", "triton", "torch"]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 only under the interpreter (tf32 on GPU)


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _device_props(device_index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(device_index)
    return props.name, props.multi_processor_count


def _props(device: torch.device) -> tuple[str, int]:
    """(name, SMs) of a CUDA device (cached: a driver query, not a sync); ("cpu", 1) elsewhere (the interpreter)."""
    if device.type != "cuda":
        return "cpu", 1
    return _device_props(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    return _props(device)[1]


def decode_config(q: torch.Tensor, k_cache: torch.Tensor, max_context: int) -> DecodeConfig:
    """The launch for this call: the device's committed tuning table when there is one, else ``default_config``."""
    name, sms = _props(q.device)
    b, kv_heads = q.shape[0], k_cache.shape[1]
    tuning = packaged_tuning(name)
    if tuning is None:
        return default_config(b, kv_heads, max_context, sms)
    return tuning.config_for(b, kv_heads, q.shape[1] // kv_heads, max_context, k_cache.dtype == torch.int8, sms)


def triton_supports(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """None when the Triton kernel can run these tensors, else the reason it cannot."""
    head_dim = q.shape[-1]
    if not _have_triton():
        return "triton is not installed"
    if q.dtype not in TRITON_DTYPES:
        return f"query dtype {q.dtype}"
    if k_cache.dtype not in (q.dtype, torch.int8):
        return f"cache dtype {k_cache.dtype} with query dtype {q.dtype}"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if q.shape[1] // k_cache.shape[1] > 128:
        return f"group of {q.shape[1] // k_cache.shape[1]} query heads per kv head"
    return None


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
           v_scale: torch.Tensor | None, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [batch, num_heads, head_dim] and the cache [num_blocks, kv_heads, block_size,"
                         f" head_dim]; got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    b, num_heads, head_dim = q.shape
    _, kv_heads, block_size, cache_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} and its strides")
    if cache_dim != head_dim or num_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {kv_heads} kv heads x {cache_dim} dims")
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    if (k_cache.dtype == torch.int8) != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("an int8 cache needs k_scale and v_scale; an fp cache takes None for both")
    if k_scale is not None and (k_scale.shape != (*k_cache.shape[:3], 1) or v_scale.shape != k_scale.shape):
        raise ValueError(f"scales must be {(*k_cache.shape[:3], 1)}, got {tuple(k_scale.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [batch={b}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along a row")
    if context_lens.shape != (b,) or context_lens.dtype != torch.int32 \
            or not context_lens.is_contiguous():
        raise ValueError(f"context_lens must be contiguous int32 [batch={b}], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, max_context: int, *,
                           config: DecodeConfig | None = None, backend: Backend = "auto") -> torch.Tensor:
    """One new token per row: rotated q ``[batch, num_heads, head_dim]`` attends over the first
    ``context_lens[i]`` tokens of its row's blocks (that count includes the token itself, already written);
    ``max_context`` (a Python int the caller buckets) bounds every ``context_lens[i]`` and fixes the launch grid.
    Returns ``[batch, num_heads, head_dim]`` in q's dtype; a row with context 0 gives zeros.

    ``backend="auto"`` takes Triton for CUDA tensors it supports, else torch; ``"triton"`` insists (the CPU tests
    use it under ``TRITON_INTERPRET=1``). ``config`` overrides the launch parameters (default: ``decode_config``,
    the device's committed tuning table or ``default_config``)."""
    _check(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens)
    if max_context < 1:
        raise ValueError(f"max_context must be >= 1, got {max_context}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    why_not = triton_supports(q, k_cache) if backend != "torch" else "backend='torch'"
    use_triton = why_not is None and (backend == "triton" or (q.is_cuda and q.dtype != torch.float32))
    if backend == "triton" and why_not is not None:
        raise ValueError(f"the Triton decode kernel cannot run this call: {why_not}")
    if not use_triton:
        return paged_decode_attention_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
                                          scale, max_context)
    from serving.kernels.paged_attention_triton import paged_decode_attention_triton

    if config is None:
        config = decode_config(q, k_cache, max_context)
    return paged_decode_attention_triton(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
                                         scale, max_context, config)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, slot_mapping: torch.Tensor, *,
             backend: Backend = "auto") -> None:
    """Store k/v ``[num_tokens, kv_heads, head_dim]`` at ``slot_mapping`` (int64 ``[num_tokens]``, physical block
    * block_size + offset), int8-quantized when scales are given (``quantize_int8``'s rule, bit for bit). Graph
    safe. Every slot must be a real one: point batch padding at a scratch block the tables never list.
    ``backend="auto"``: one Triton launch on CUDA, torch index_put elsewhere."""
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]):
        raise ValueError(f"k/v must be [num_tokens, {k_cache.shape[1]}, {k_cache.shape[3]}], got {tuple(k.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64 \
            or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous int64 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if (k_cache.dtype == torch.int8) != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("an int8 cache needs k_scale and v_scale; an fp cache takes None for both")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    head_dim = k.shape[-1]
    why_not = None if _have_triton() else "triton is not installed"
    if head_dim < 16 or head_dim & (head_dim - 1):
        why_not = f"head_dim {head_dim} is not a power of two >= 16"
    elif k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        why_not = "k/v and the caches must be contiguous in head_dim, the caches alike"
    if backend == "triton" and why_not is not None:
        raise ValueError(f"the Triton write_kv kernel cannot run this call: {why_not}")
    if backend == "torch" or why_not is not None or (backend == "auto" and not k.is_cuda):
        write_kv_ref(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)
        return
    from serving.kernels.paged_attention_triton import write_kv_triton

    write_kv_triton(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None, slot_mapping: torch.Tensor, *,
                  backend: Backend = "auto") -> torch.Tensor:
    """A decode step's rotary embedding and K/V write: q ``[n, heads * head_dim]``, k/v ``[n, kv_heads *
    head_dim]`` (each row contiguous), cos/sin ``[n, head_dim]`` (HF's rotate-half convention); k is rotated,
    then stored with v at ``slot_mapping`` as ``write_kv`` does (int8 when scales are given). Returns the rotated
    q ``[n, heads, head_dim]``. ``backend="auto"``: one Triton launch on CUDA (rotation in fp32, rounded once to
    the activations' dtype), the torch reference elsewhere."""
    n, kv_heads, head_dim = q.shape[0], k_cache.shape[1], k_cache.shape[3]
    if q.dim() != 2 or q.shape[1] % head_dim or k.shape != (n, kv_heads * head_dim) or v.shape != k.shape:
        raise ValueError(f"q must be [n, heads * {head_dim}] and k/v [n, {kv_heads * head_dim}], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cos.shape != (n, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{n}, {head_dim}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if slot_mapping.shape != (n,) or slot_mapping.dtype != torch.int64 \
            or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous int64 [{n}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    why_not = None if _have_triton() else "triton is not installed"
    if head_dim < 16 or head_dim & (head_dim - 1):
        why_not = f"head_dim {head_dim} is not a power of two >= 16"
    elif any(t.stride(-1) != 1 for t in (q, k, v, cos, sin)) or k_cache.stride(-1) != 1 \
            or v_cache.stride() != k_cache.stride():
        why_not = "q/k/v/cos/sin and the caches must be contiguous in their last dim, the caches alike"
    if backend == "triton" and why_not is not None:
        raise ValueError(f"the Triton rope_write_kv kernel cannot run this call: {why_not}")
    if backend == "torch" or why_not is not None or (backend == "auto" and not q.is_cuda):
        return rope_write_kv_ref(q, k, v, cos, sin, k_cache, v_cache, k_scale, v_scale, slot_mapping)
    from serving.kernels.paged_attention_triton import rope_write_kv_triton

    return rope_write_kv_triton(q, k, v, cos, sin, k_cache, v_cache, k_scale, v_scale, slot_mapping)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, block_table: torch.Tensor,
                            start: int, scale: float, *, backend: Backend = "auto") -> torch.Tensor:
    """One sequence's chunk: q ``[num_tokens, num_heads, head_dim]`` at positions ``start ..``, causal over the
    cache's positions ``0 .. start + num_tokens - 1`` (the chunk's K/V already written). ``backend="auto"`` and
    ``"torch"``: the gather + SDPA reference on every device (it runs once per chunk, outside the decode graphs);
    ``"triton"``: the flash-attention kernel over blocks (``paged_prefill_attention_triton``), which the engine's
    no-vendor-BLAS mode (``engine.vendor_blas=false``) takes so that the process never loads SDPA's kernels."""
    if q.dim() != 3 or block_table.dim() != 1:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim] and block_table [max_blocks]; got "
                         f"{tuple(q.shape)} and {tuple(block_table.shape)}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    if backend != "triton":
        return paged_prefill_attention_ref(q, k_cache, v_cache, k_scale, v_scale, block_table, start, scale)
    why_not = triton_supports(q, k_cache)
    end = start + q.shape[0]
    if why_not is None and q.stride(-1) != 1:
        why_not = "q must be contiguous in head_dim"
    if why_not is None and -(-end // k_cache.shape[2]) > block_table.shape[0]:
        raise ValueError(f"prefill up to position {end} needs {-(-end // k_cache.shape[2])} blocks, the table "
                         f"holds {block_table.shape[0]}")
    if why_not is not None:
        raise ValueError(f"the Triton prefill kernel cannot run this call: {why_not}")
    if block_table.dtype != torch.int32 or not block_table.is_contiguous():
        raise ValueError(f"block_table must be contiguous int32, got {block_table.dtype}")
    from serving.kernels.paged_attention_triton import paged_prefill_attention_triton

    return paged_prefill_attention_triton(q, k_cache, v_cache, k_scale, v_scale, block_table, start, scale)
