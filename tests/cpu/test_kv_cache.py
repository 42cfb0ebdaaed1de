"""The paged KV cache's bookkeeping (block pool, block tables, prefix cache) and the torch attention over blocks."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from serving.kernels.paged_attention_ref import gather_kv, paged_decode_attention_ref, paged_prefill_attention_ref
from serving.kernels.paged_attention_ref import write_kv_ref as write_kv
from serving.kv_cache import BlockPool, KVCacheManager, block_key


def _check_invariants(kv: KVCacheManager) -> None:
    pool = kv.pool
    holders = [0] * pool.num_blocks
    for t in kv.tables.values():
        assert len(set(t.blocks)) == len(t.blocks), "a table lists a block twice"
        for b in t.blocks:
            holders[b] += 1
    assert holders[0] == 0 and pool.ref[0] == 0, "the reserved block 0 was handed out"
    # no block is shared without its count: every reference is a table holding it, and vice versa
    assert pool.ref == holders
    free, evictable = set(pool.free), set(pool.evictable)
    assert not free & evictable and len(free) == len(pool.free)
    referenced = {b for b in range(1, pool.num_blocks) if pool.ref[b] > 0}
    assert not referenced & (free | evictable), "a referenced block is also free"
    assert len(referenced) + pool.num_free == pool.usable, "blocks leaked or doubled"
    for key, b in pool.cached.items():
        assert pool.key_of[b] == key
    assert all(pool.key_of[b] is not None for b in evictable)


@pytest.mark.parametrize("seed", range(4))
def test_allocator_property_random_arrivals_aborts_finishes(seed: int):
    """Random arrivals (prompts sharing prefixes), growth token by token, aborts and finishes under a small pool:
    after every operation each block's count equals the tables holding it and the free blocks plus the
    referenced ones are the whole pool; when everything has ended all blocks are free again."""
    rng = random.Random(seed)
    bs = 4
    kv = KVCacheManager(num_blocks=24, block_size=bs, enable_prefix_caching=True)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: dict[str, list[int]] = {}
    hits = 0
    for step in range(600):
        op = rng.random()
        if op < 0.35:  # arrival
            toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            ok, need, cached = kv.can_admit(toks)
            headroom = kv.headroom_after_admit(toks)  # what the scheduler's lookahead reserve is checked against
            assert (headroom >= 0) == ok
            sid = f"s{step}"
            if ok:
                got = kv.admit(sid, toks)
                assert got == cached and got % bs == 0 and got < len(toks)
                assert kv.pool.num_free == headroom, "admission took other blocks than headroom_after_admit said"
                hits += got
                assert len(kv.tables[sid].blocks) == kv.blocks_for(len(toks))
                kv.commit_full_blocks(sid, toks, len(toks))
                live[sid] = toks
            else:
                with pytest.raises(MemoryError):
                    kv.admit(sid, toks)
        elif op < 0.8 and live:  # one decode token for a live sequence
            sid = rng.choice(list(live))
            toks = live[sid]
            if kv.append_slot_needed(sid, len(toks)):
                if kv.pool.num_free == 0:
                    kv.free(sid)  # what the scheduler's preemption does
                    del live[sid]
                    _check_invariants(kv)
                    continue
                kv.grow(sid)
            toks.append(rng.randrange(50))
            kv.commit_full_blocks(sid, toks, len(toks))
        elif live:  # finish or abort: the same release
            sid = rng.choice(list(live))
            kv.free(sid)
            del live[sid]
        _check_invariants(kv)
    for sid in list(live):
        kv.free(sid)
    _check_invariants(kv)
    assert kv.pool.num_free == kv.pool.usable and not kv.tables
    assert hits > 0, "the shared prefixes never hit: the test exercised no sharing"


def test_prefix_chain_hits_only_the_same_prefix_and_model():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.admit("a", a) == 0
    kv.commit_full_blocks("a", a, len(a))
    # same first block, different second: one block shared, by reference
    b = a[:4] + [99] * 6
    assert kv.admit("b", b) == 4
    assert kv.tables["b"].blocks[0] == kv.tables["a"].blocks[0]
    assert kv.pool.ref[kv.tables["a"].blocks[0]] == 2
    # a fully cached prompt leaves its last block to compute (its logits start the reply)
    c = a[:8]
    assert kv.admit("c", c) == 4
    # the same tokens under another model id share nothing
    other = KVCacheManager(num_blocks=16, block_size=4, extra_key="adapter-1")
    assert block_key(None, a[:4], "adapter-1") != block_key(None, a[:4])
    other.admit("a", a)
    other.commit_full_blocks("a", a, len(a))
    kv.free("a")
    assert kv.pool.lookup(block_key(None, a[:4])) is not None  # still cached after its owner ended
    off = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    off.admit("a", a)
    off.commit_full_blocks("a", a, len(a))
    assert off.admit("b", a) == 0


def test_lru_eviction_only_when_free_blocks_run_out():
    pool = BlockPool(num_blocks=5)  # 4 usable
    blocks = [pool.allocate() for _ in range(2)]
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]) * 16)
        pool.release(b)
    assert pool.num_free == 4 and pool.evictions == 0
    fresh = [pool.allocate(), pool.allocate()]  # never-used blocks go first: the cached ones survive
    assert set(fresh).isdisjoint(blocks) and pool.lookup(bytes([0]) * 16) == blocks[0]
    pool.take(blocks[1])  # a hit makes block 1 recently used and referenced
    pool.release(blocks[1])
    assert pool.allocate() == blocks[0] and pool.evictions == 1  # least recently used is evicted first
    assert pool.lookup(bytes([0]) * 16) is None and pool.lookup(bytes([1]) * 16) == blocks[1]
    assert pool.allocate() == blocks[1]
    with pytest.raises(MemoryError):
        pool.allocate()


@pytest.mark.parametrize("quant", [False, True])
def test_paged_attention_refs_equal_dense_attention(quant: bool):
    """The torch path over scattered blocks equals plain SDPA over the same K/V laid out densely (GQA, int8)."""
    g = torch.Generator().manual_seed(0)
    nb, kvh, bs, hd, groups = 12, 2, 4, 8, 2
    kc = torch.zeros(nb, kvh, bs, hd, dtype=torch.int8 if quant else torch.float32)
    vc = torch.zeros_like(kc)
    ks = torch.ones(nb, kvh, bs, 1) if quant else None
    vs = torch.ones(nb, kvh, bs, 1) if quant else None
    lens = [7, 13]
    tables = torch.tensor([[5, 2, 0, 0], [9, 1, 11, 3]], dtype=torch.int32)
    dense = []
    for row, n in enumerate(lens):
        k = torch.randn(n, kvh, hd, generator=g)
        v = torch.randn(n, kvh, hd, generator=g)
        slots = torch.tensor([int(tables[row, p // bs]) * bs + p % bs for p in range(n)])
        write_kv(k, v, kc, vc, ks, vs, slots)
        dense.append(tuple(x[0] for x in gather_kv(kc, vc, ks, vs, tables[row:row + 1], -(-n // bs), torch.float32)))
        back_k = dense[-1][0][:, :n].transpose(0, 1)
        assert torch.allclose(back_k, k, atol=0.05 if quant else 0)
    q = torch.randn(2, kvh * groups, hd, generator=g)
    out = paged_decode_attention_ref(q, kc, vc, ks, vs, tables, torch.tensor(lens, dtype=torch.int32), hd ** -0.5,
                                     max_context=16)
    for row, n in enumerate(lens):
        kk, vv = (x[:, :n].repeat_interleave(groups, 0) for x in dense[row])
        ref = F.scaled_dot_product_attention(q[row][:, None], kk, vv)[:, 0]
        assert torch.allclose(out[row], ref, atol=1e-5)
    # prefill: the last 5 tokens of row 1 as a chunk, causal over everything before them
    qc = torch.randn(5, kvh * groups, hd, generator=g)
    o = paged_prefill_attention_ref(qc, kc, vc, ks, vs, tables[1], 8, hd ** -0.5)
    kk, vv = (x[:, :13].repeat_interleave(groups, 0) for x in dense[1])
    mask = torch.arange(13)[None] <= torch.arange(8, 13)[:, None]
    ref = F.scaled_dot_product_attention(qc.transpose(0, 1), kk, vv, attn_mask=mask).transpose(0, 1)
    assert torch.allclose(o, ref, atol=1e-5)
