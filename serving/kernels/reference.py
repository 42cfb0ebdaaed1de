"""Torch references for the standard GPTQ 4-bit format, and random checkpoints in it (tests and benchmarks).

The format (AutoGPTQ / GPTQModel, ``checkpoint_format: gptq``), for a linear with K inputs and N outputs:
``qweight`` int32 [K/8, N], eight 4-bit values along K per word (k = 8*row + j in bits 4j..4j+3);
``qzeros`` int32 [G, ceil(N/8)], eight zero points along N per word; ``scales`` [G, N];
``g_idx`` int32 [K], the group of each input column (act-order checkpoints permute it). The weight is
``W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]`` and the layer computes ``x @ W (+ bias)``.
``zero_offset``: v1 checkpoints (what is on disk) store ``z - 1``, GPTQModel's internal v2 stores ``z``.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit values per int32 word


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] packed along K -> uint8 [K, N]."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts.view(1, PACK, 1)) & 15  # [K/8, 8, N]
    return q.reshape(-1, qweight.shape[1]).to(torch.uint8)


def unpack_cols(qzeros: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [G, ceil(N/8)] packed along N -> uint8 [G, N]."""
    shifts = torch.arange(0, 32, 4, device=qzeros.device, dtype=torch.int32)
    z = (qzeros.unsqueeze(2) >> shifts.view(1, 1, PACK)) & 15  # [G, N/8, 8]
    return z.reshape(qzeros.shape[0], -1)[:, :n].to(torch.uint8)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """uint8 [K, N] (K a multiple of 8) -> int32 [K/8, N]."""
    k, n = q.shape
    v = q.to(torch.int64).view(k // PACK, PACK, n)
    word = sum(v[:, j] << (4 * j) for j in range(PACK))
    return _to_int32(word)


def pack_cols(z: torch.Tensor) -> torch.Tensor:
    """uint8 [G, N] -> int32 [G, ceil(N/8)] (N padded with zeros)."""
    g, n = z.shape
    pad = (-n) % PACK
    v = torch.nn.functional.pad(z.to(torch.int64), (0, pad)).view(g, -1, PACK)
    word = sum(v[:, :, j] << (4 * j) for j in range(PACK))
    return _to_int32(word)


def _to_int32(word: torch.Tensor) -> torch.Tensor:
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               zero_offset: int = 1) -> torch.Tensor:
    """The float32 weight W [K, N] of a GPTQ 4-bit linear."""
    q = unpack_rows(qweight).float()
    n = scales.shape[1]
    z = unpack_cols(qzeros, n).float() + zero_offset
    if g_idx is None:
        g_idx = torch.arange(q.shape[0], device=q.device) // (q.shape[0] // scales.shape[0])
    g = g_idx.long()
    return (q - z[g]) * scales.float()[g]


def gptq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bias: torch.Tensor | None = None, zero_offset: int = 1) -> torch.Tensor:
    """``x @ W (+ bias)`` in float32 (the reference every kernel is checked against)."""
    y = x.float() @ dequantize(qweight, qzeros, scales, g_idx, zero_offset)
    return y if bias is None else y + bias.float()


def random_gptq(k: int, n: int, group_size: int = 128, sym: bool = True, act_order: bool = False,
                seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random GPTQ 4-bit tensors in the v1 on-disk format (zero points stored minus one).

    ``group_size=-1``: one group over all of K. Asymmetric zero points are drawn from 1..15: a v1 checkpoint
    cannot store a zero point of 0 (it would be written as -1). ``act_order``: columns quantized in a random
    order, groups formed in that order, so ``g_idx`` is a permutation of the group labels."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    if sym:
        z = torch.full((groups, n), 8, dtype=torch.uint8)
    else:
        z = torch.randint(1, 16, (groups, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half()
    order = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    out = {"qweight": pack_rows(q), "qzeros": pack_cols(z - 1), "scales": scales, "g_idx": g_idx}
    return {name: t.to(device) for name, t in out.items()}
