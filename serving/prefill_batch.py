"""Several fresh prompts prefilled in one forward (``LLMEngine._step``): the prompts of one engine step that start at
position 0 (no cached prefix) and end in this chunk, right-padded into one ``[rows, longest]`` batch.

Attention is causal over the batch itself (SDPA with ``is_causal``: FlashAttention on CUDA), which is exact for
every real token: a row's padding sits after its last real token, so the causal mask keeps it out of every real
query. K/V of the real tokens only are written to the cache (the same ``write_kv`` as the one-sequence path), and
the logits are those of each row's last real token. Only for an unquantized cache: with int8 K/V the
one-sequence path attends over the dequantized cache, and this one would attend over the unrounded K/V.

Why: the one-sequence path (``LlamaRunner.prefill``) runs one eager forward per prompt and chunk, each about 25
small kernels a layer; a PPO rollout of 16 prompts of ~260 tokens on the 1.1B shape took 32 of them (chunk 256),
host-bound on the H200. Batched, the rollout's prompts are one forward.

Uses the runner's modules and pieces (embedding, rotary, q/k/v projection, MLP block, norm, lm_head); imports
only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.kernels.paged_attention_ref import write_kv_ref as write_kv


def can_batch(runner) -> bool:
    cache = runner.cache
    return cache is not None and all(s is None for s in cache.ks)


@torch.inference_mode()
def prefill_fresh(runner, prompts: list[list[int]], tables: list[list[int]]) -> torch.Tensor:
    """``prompts[i]`` from position 0 into the blocks ``tables[i]``; -> logits of each last token ``[rows, V]``
    (float32)."""
    cache, dev = runner.cache, runner.device
    bs = cache.block_size
    n = len(prompts)
    lens = [len(p) for p in prompts]
    t = max(lens)
    ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts], dtype=torch.long)
    # flat index (row * t + position) and cache slot of every real token, in one host tensor and one copy
    real = [(i * t + q, blocks[q // bs] * bs + q % bs) for i, (length, blocks) in enumerate(zip(lens, tables,
                                                                                               strict=True))
            for q in range(length)]
    index_slots = torch.tensor(real, dtype=torch.long).to(dev, non_blocking=True)
    index, slots = index_slots[:, 0], index_slots[:, 1].contiguous()
    last = torch.tensor([i * t + length - 1 for i, length in enumerate(lens)], dtype=torch.long).to(dev)
    h = runner.embed(ids.view(-1)).view(n, t, -1)
    pos = torch.arange(t, device=dev).expand(n, t)
    cos, sin = runner.rotary(h, pos)
    groups = runner.n_heads // runner.kv_heads
    for i, layer in enumerate(runner.layers):
        attn = layer.self_attn
        q, k, v = runner._qkv(attn, layer.input_layernorm(h), cos, sin)  # [n, t, heads, head_dim]
        write_kv(k.reshape(n * t, runner.kv_heads, -1).index_select(0, index),
                 v.reshape(n * t, runner.kv_heads, -1).index_select(0, index),
                 cache.k[i], cache.v[i], cache.ks[i], cache.vs[i], slots)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=runner.scale)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(n, t, runner.n_heads * runner.head_dim))
        h = runner._mlp_block(layer, h)
    return runner.lm_head(runner.norm(h.reshape(n * t, -1).index_select(0, last))).float()
