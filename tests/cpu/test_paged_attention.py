"""Paged attention: the torch reference against plain dense SDPA, and the Triton decode kernel (run by Triton's
interpreter on CPU, ``TRITON_INTERPRET=1``) against the reference: block sizes 8/16/32, contexts that end inside a
block, shuffled physical blocks, GQA groups 1/2/4, head_dim 64/128, fp32/fp16 and int8 caches, rows of different
lengths, direct and split-K launches."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from serving.kernels.paged_attention import (
    DecodeConfig,
    DecodeTuning,
    paged_decode_attention,
    paged_prefill_attention,
    rope_write_kv,
    write_kv,
)
from serving.kernels.paged_attention_ref import quantize_int8
from serving.kernels.paged_attention_tuning import (
    TunedShape,
    default_config,
    device_slug,
    packaged_tuning,
    split_plan,
)


@pytest.fixture(scope="module")
def interpreted():
    """``TRITON_INTERPRET=1`` for this module's tests, restored afterwards. Triton reads it when any jit function
    is decorated, its own standard library's included, so it must be set before triton is first imported."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
        pytest.importorskip("numpy")
        mod = importlib.import_module("serving.kernels.paged_attention_triton")
        if type(mod._split_kernel).__name__ != "InterpretedFunction":
            mod = importlib.reload(mod)
        yield mod


class Case:
    """Random dense K/V per row, written token by token (``write_kv``) into shuffled physical blocks."""

    def __init__(self, lens: list[int], kv_heads: int, group: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, int8: bool, seed: int = 0, spare_blocks: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.dtype, self.block_size = lens, dtype, block_size
        b, nh = len(lens), kv_heads * group
        width = max(math.ceil(n / block_size) for n in lens) + 1  # one unused column: entry 0, never read
        total = sum(math.ceil(n / block_size) for n in lens) + spare_blocks
        cache_dtype = torch.int8 if int8 else dtype
        shape = (total, kv_heads, block_size, head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
        self.k_scale = torch.zeros((*shape[:3], 1), dtype=dtype) if int8 else None
        self.v_scale = torch.zeros((*shape[:3], 1), dtype=dtype) if int8 else None
        phys = torch.randperm(total, generator=g).tolist()
        self.block_tables = torch.zeros((b, width), dtype=torch.int32)
        self.k, self.v = [], []  # dense [kvh, n, hd] per row, as the cache holds them (int8: dequantized)
        for i, n in enumerate(lens):
            nb = math.ceil(n / block_size)
            row_blocks = [phys.pop() for _ in range(nb)]
            self.block_tables[i, :nb] = torch.tensor(row_blocks, dtype=torch.int32)
            k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
            pos = torch.arange(n)
            slots = torch.tensor(row_blocks, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size
            write_kv(k, v, self.k_cache, self.v_cache, self.k_scale, self.v_scale, slots)
            if int8:
                (kq, ks), (vq, vs) = quantize_int8(k, dtype), quantize_int8(v, dtype)
                k, v = kq.to(dtype) * ks, vq.to(dtype) * vs
            self.k.append(k.transpose(0, 1))
            self.v.append(v.transpose(0, 1))
        self.context_lens = torch.tensor(lens, dtype=torch.int32)
        self.q = torch.randn(b, nh, head_dim, generator=g).to(dtype)
        self.scale = head_dim ** -0.5
        self.group = group

    def cache_args(self):
        return self.k_cache, self.v_cache, self.k_scale, self.v_scale

    def decode(self, max_context: int | None = None, **kw) -> torch.Tensor:
        return paged_decode_attention(self.q, *self.cache_args(), self.block_tables, self.context_lens, self.scale,
                                      max(self.lens) if max_context is None else max_context, **kw)

    def dense_decode(self) -> torch.Tensor:
        """Plain SDPA per row over its dense K/V, GQA by repeating K/V per group (no paging, no mask)."""
        outs = []
        for i in range(len(self.lens)):
            k = self.k[i].float().repeat_interleave(self.group, dim=0)
            v = self.v[i].float().repeat_interleave(self.group, dim=0)
            o = F.scaled_dot_product_attention(self.q[i].float()[:, None], k, v, scale=self.scale)
            outs.append(o[:, 0])
        return torch.stack(outs)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# (lens, kv_heads, group, head_dim, block_size, dtype, int8): every value of every axis appears
SHAPES = [
    ([37], 2, 1, 64, 16, torch.float32, False),
    ([17, 8, 33, 1], 2, 2, 64, 8, torch.float32, False),
    ([50, 63], 1, 4, 128, 32, torch.float32, False),
    ([40, 9, 71], 2, 4, 64, 16, torch.float16, False),
    ([31, 64], 2, 2, 128, 16, torch.float16, True),
    ([5, 47, 90], 1, 1, 64, 8, torch.float32, True),
    ([129, 3], 2, 4, 64, 32, torch.float32, True),
    ([23, 16], 2, 3, 64, 16, torch.float32, False),  # a group that is not a power of two (24 heads over 8)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lens{s[0]}-kvh{s[1]}-g{s[2]}-d{s[3]}-bs{s[4]}-"
                                                         f"{str(s[5])[6:]}{'-int8' if s[6] else ''}")
def test_reference_decode_equals_dense_sdpa(shape):
    case = Case(*shape)
    _close(case.decode(backend="torch"), case.dense_decode(), case.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lens{s[0]}-kvh{s[1]}-g{s[2]}-d{s[3]}-bs{s[4]}-"
                                                         f"{str(s[5])[6:]}{'-int8' if s[6] else ''}")
def test_triton_decode_interpreted_equals_reference(interpreted, shape):
    case = Case(*shape)
    ref = case.decode(backend="torch")
    # one split (direct store) and a split-K launch with a merge; tiles smaller and larger than a block;
    # multiply-adds instead of tl.dot (MHA only: larger groups take the dot anyway)
    for config in (DecodeConfig(num_splits=1, block_n=32), DecodeConfig(num_splits=3, block_n=16),
                   DecodeConfig(num_splits=2, block_n=16, use_dot=False)):
        _close(case.decode(backend="triton", config=config), ref, case.dtype)


def test_triton_decode_never_reads_past_the_context(interpreted):
    """NaN in every cache slot no sequence owns (block tails, spare blocks, the scale of unused slots) must not
    reach the output: the kernel masks its loads, whereas the torch gather needs a zeroed cache."""
    case = Case([13, 30], kv_heads=2, group=2, head_dim=64, block_size=8, dtype=torch.float32, int8=True)
    clean = case.decode(backend="torch")
    owned = torch.zeros(case.k_cache.shape[:3], dtype=torch.bool)
    for i, n in enumerate(case.lens):
        pos = torch.arange(n)
        owned[case.block_tables[i, pos // 8].long(), :, pos % 8] = True
    for scale in (case.k_scale, case.v_scale):
        scale[~owned] = float("nan")
    out = case.decode(backend="triton", config=DecodeConfig(num_splits=2, block_n=16))
    _close(out, clean, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_row_of_context_zero_gives_zeros(interpreted, backend):
    case = Case([20, 9], kv_heads=1, group=2, head_dim=64, block_size=8, dtype=torch.float32, int8=False)
    case.context_lens[1] = 0
    for config in (DecodeConfig(num_splits=1, block_n=16), DecodeConfig(num_splits=2, block_n=16)):
        out = case.decode(backend=backend, config=config) if backend == "triton" else case.decode(backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        _close(out[0], case.dense_decode()[0], torch.float32)


def test_max_context_bucket_does_not_change_the_result(interpreted):
    """Callers bucket max_context (the graph's shape); a larger bucket than the longest row reads nothing more."""
    case = Case([21, 5], kv_heads=2, group=1, head_dim=64, block_size=8, dtype=torch.float32, int8=False,
                spare_blocks=8)
    case.block_tables = torch.cat([case.block_tables, torch.zeros((2, 6), dtype=torch.int32)], dim=1)
    exact = case.decode(backend="torch")
    _close(case.decode(max_context=64, backend="torch"), exact, torch.float32)
    _close(case.decode(max_context=64, backend="triton", config=DecodeConfig(num_splits=4, block_n=16)), exact,
           torch.float32)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_chunked_prefill_equals_dense_causal_attention(group, int8):
    """A 45-token prompt prefilled in chunks of 16 + 13 + 16 (the cache holds each chunk's K/V before its
    attention) equals one causal SDPA over the whole prompt."""
    n, bs = 45, 8
    case = Case([n], kv_heads=2, group=group, head_dim=64, block_size=bs, dtype=torch.float32, int8=int8)
    q = torch.randn(n, 2 * group, 64, generator=torch.Generator().manual_seed(1))
    k = case.k[0].repeat_interleave(group, dim=0)
    v = case.v[0].repeat_interleave(group, dim=0)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=case.scale)
    dense = dense.transpose(0, 1)
    outs, start = [], 0
    for t in (16, 13, 16):
        outs.append(paged_prefill_attention(q[start:start + t], *case.cache_args(), case.block_tables[0], start,
                                            case.scale))
        start += t
    _close(torch.cat(outs), dense, torch.float32)


def test_write_kv_int8_round_trip():
    k = torch.randn(5, 2, 64, dtype=torch.float16)
    kc = torch.zeros(4, 2, 8, 64, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(4, 2, 8, 1, dtype=torch.float16)
    vs = torch.zeros_like(ks)
    slots = torch.tensor([3 * 8 + 7, 0, 9, 10, 2 * 8 + 1], dtype=torch.int64)
    write_kv(k, -k, kc, vc, ks, vs, slots)
    blk, off = slots // 8, slots % 8
    back = kc[blk, :, off].to(torch.float16) * ks[blk, :, off]
    torch.testing.assert_close(back, k, atol=k.abs().max().item() / 127, rtol=0)
    assert torch.equal(vc[blk, :, off], -kc[blk, :, off])
    untouched = torch.ones(4, 8, dtype=torch.bool)
    untouched[blk, off] = False
    assert kc.transpose(1, 2)[untouched].abs().sum() == 0 and ks.transpose(1, 2)[untouched].abs().sum() == 0


def _zero_caches(shape: tuple[int, ...], dtype: torch.dtype, int8: bool):
    """Zeroed K/V caches ``shape`` (int8 with per-token scales, or ``dtype``): (kc, vc, ks, vs)."""
    kc = torch.zeros(shape, dtype=torch.int8 if int8 else dtype)
    ks = torch.zeros((*shape[:3], 1), dtype=dtype) if int8 else None
    return kc, torch.zeros_like(kc), ks, torch.zeros_like(ks) if int8 else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
def test_triton_write_kv_interpreted_equals_torch_bit_for_bit(interpreted, dtype, int8):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(6, 2, 64, generator=g).to(dtype)
    v = torch.randn(6, 2, 64, generator=g).to(dtype)
    # a row whose scale is exactly 1 (amax 127) with halves: torch.round sends ties to even, so must the kernel
    k[0, 0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    slots = torch.tensor([5 * 8 + 7, 0, 9, 3 * 8 + 2, 17, 4 * 8], dtype=torch.int64)
    outs = []
    for backend in ("torch", "triton"):
        kc, vc, ks, vs = _zero_caches((6, 2, 8, 64), dtype, int8)
        write_kv(k, v, kc, vc, ks, vs, slots, backend=backend)
        outs.append((kc, vc, ks, vs))
    for a, b in zip(*outs, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    if int8:
        assert outs[1][0][5, 0, 7, :4].tolist() == [127, 2, -4, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (2, 2, 128), (8, 1, 16)])
def test_triton_rope_write_kv_interpreted_matches_torch(interpreted, dtype, int8, heads, kv_heads, head_dim):
    """One launch rotates the step's queries and keys (HF's rotate-half) and writes K/V (int8-quantized as
    write_kv does) at the slots: against the torch reference (rotation, then write_kv), rows of q/k/v taken as
    views of one fused projection output as the engine passes them. fp32 agrees to rounding; fp16 to one
    rounding (the kernel rotates in fp32 and rounds once, torch rounds each op), int8 values to 1 step."""
    g = torch.Generator().manual_seed(heads * 10 + head_dim)
    n, bs = 5, 8
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    pos = torch.tensor([0, 3, 17, 100, 7], dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.tensor([5 * bs + 7, 0, 9, 3 * bs + 2, 17], dtype=torch.int64)
    outs = []
    for backend in ("torch", "triton"):
        kc, vc, ks, vs = _zero_caches((6, kv_heads, bs, head_dim), dtype, int8)
        qr = rope_write_kv(q, k, v, cos, sin, kc, vc, ks, vs, slots, backend=backend)
        outs.append((qr, kc, vc, ks, vs))
    (q0, kc0, vc0, ks0, vs0), (q1, kc1, vc1, ks1, vs1) = outs
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    assert q1.shape == (n, heads, head_dim)
    torch.testing.assert_close(q1, q0, **tol)
    if int8:
        assert (kc1.int() - kc0.int()).abs().max() <= 1 and torch.equal(vc1, vc0) and torch.equal(vs1, vs0)
        torch.testing.assert_close(ks1, ks0, **tol)
    else:
        torch.testing.assert_close(kc1, kc0, **tol)
        assert torch.equal(vc1, vc0)
    untouched = torch.ones(6, bs, dtype=torch.bool)
    untouched[slots // bs, slots % bs] = False
    assert kc1.transpose(1, 2)[untouched].abs().sum() == 0  # only the slots were written


def test_rope_write_kv_arguments_are_named():
    kc = torch.zeros(2, 1, 8, 16)
    ok = dict(cos=torch.zeros(1, 16), sin=torch.zeros(1, 16), k_cache=kc, v_cache=kc.clone(), k_scale=None,
              v_scale=None, slot_mapping=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="k/v"):
        rope_write_kv(torch.zeros(1, 32), torch.zeros(1, 32), torch.zeros(1, 32), **ok)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_write_kv(torch.zeros(1, 32), torch.zeros(1, 16), torch.zeros(1, 16),
                      **{**ok, "cos": torch.zeros(1, 8)})
    with pytest.raises(ValueError, match="power of two"):
        kc12 = torch.zeros(2, 1, 8, 12)
        rope_write_kv(torch.zeros(1, 24), torch.zeros(1, 12), torch.zeros(1, 12), torch.zeros(1, 12),
                      torch.zeros(1, 12), kc12, kc12.clone(), None, None, ok["slot_mapping"], backend="triton")


def test_bad_arguments_are_named():
    case = Case([10], kv_heads=2, group=2, head_dim=64, block_size=8, dtype=torch.float32, int8=False)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(case.q, *case.cache_args(), case.block_tables.long(), case.context_lens, 1.0, 16)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_decode_attention(case.q, case.k_cache.to(torch.int8), case.v_cache.to(torch.int8), None, None,
                               case.block_tables, case.context_lens, 1.0, 16)
    with pytest.raises(ValueError, match="max_context"):
        case.decode(max_context=0)
    with pytest.raises(ValueError, match="needs 4 blocks, the table holds 3"):
        paged_prefill_attention(case.q[:1].expand(30, -1, -1), *case.cache_args(), case.block_tables[0], 0, 1.0)
    with pytest.raises(ValueError, match="slot_mapping must be contiguous int64"):
        write_kv(case.k[0].transpose(0, 1), case.v[0].transpose(0, 1), case.k_cache, case.v_cache, None, None,
                 torch.arange(10, dtype=torch.int32))


def test_triton_refuses_what_it_cannot_run(interpreted):
    q = torch.randn(1, 2, 48)
    kc = torch.zeros(2, 2, 8, 48)
    with pytest.raises(ValueError, match="head_dim 48"):
        paged_decode_attention(q, kc, kc.clone(), None, None, torch.zeros((1, 1), dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32), 1.0, 8, backend="triton")


def test_split_plan_covers_the_context_in_whole_tiles():
    for ctx in (1, 15, 16, 17, 100, 4096):
        for splits in (1, 2, 3, 8, 64):
            cfg = DecodeConfig(num_splits=splits, block_n=16)
            per, n = split_plan(ctx, cfg)
            assert per % 16 == 0 and n * per >= ctx > (n - 1) * per and n <= splits


def test_default_config_splits_only_a_short_grid():
    assert default_config(batch=1, kv_heads=32, max_context=4096, sm_count=132).num_splits == 8
    assert default_config(batch=1, kv_heads=8, max_context=4096, sm_count=132).num_splits == 32
    assert default_config(batch=8, kv_heads=32, max_context=4096, sm_count=132).num_splits == 1
    assert default_config(batch=1, kv_heads=32, max_context=256, sm_count=132).num_splits == 2


def test_tuning_table_round_trip_and_nearest_shape(tmp_path):
    fast = DecodeConfig(num_splits=16, block_n=32, num_warps=8, use_dot=False)
    table = DecodeTuning(device="test", entries=[
        TunedShape(1, 32, 1, 4096, False, fast, 10.0),
        TunedShape(8, 32, 1, 512, False, DecodeConfig(), 20.0),
        TunedShape(1, 32, 1, 4096, True, DecodeConfig(num_splits=4), 9.0),
    ])
    path = tmp_path / "tuning.json"
    table.save(path)
    back = DecodeTuning.load(path)
    assert back == table
    assert back.config_for(1, 32, 1, 3000, False, 132) == fast
    assert back.config_for(8, 32, 1, 1024, False, 132) == DecodeConfig()
    assert back.config_for(2, 32, 1, 4096, True, 132).num_splits == 4
    assert DecodeTuning().config_for(1, 32, 1, 4096, False, 132) == default_config(1, 32, 4096, 132)
    # committed under the device's slug, the table is found by name
    assert device_slug("NVIDIA H200") == "nvidia-h200"
    (tmp_path / "nvidia-h200.json").write_text(path.read_text())
    assert packaged_tuning("NVIDIA H200", tmp_path) == table
    assert packaged_tuning("NVIDIA A10", tmp_path) is None
    path.write_text('{"entries": [{"batch": 1}]}')
    with pytest.raises(ValueError, match="bad entry"):
        DecodeTuning.load(path)


# Compiles the kernels for an H100/H200 (sm_90) without a GPU: the interpreter accepts programs the compiler
# rejects (tl.dot shapes, dtypes), so this is CI's check that the GPU build works. A fresh process, because the
# interpreter's environment variable changes what ``triton.jit`` builds.
AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from serving.kernels import paged_attention_triton as m

def compile(fn, types, constexprs, warps):
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    # what the launcher specializes at run time: 16-byte aligned pointers and strides divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("ptr") or (n.startswith("stride") and n != "stride_st") or n == "tokens_per_split"}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))

fp = {n: "*fp16" for n in ("q_ptr", "out_ptr", "ks_ptr", "vs_ptr")}
split = {**fp, "k_ptr": "*i8", "v_ptr": "*i8", "bt_ptr": "*i32", "lens_ptr": "*i32", "po_ptr": "*fp32",
         "pm_ptr": "*fp32", "pl_ptr": "*fp32", "qk_scale": "fp32"}
k = compile(m._split_kernel, split, dict(GROUP=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=64, INT8=True,
                                         DIRECT=False, USE_DOT=True), 4)
mha = compile(m._split_kernel, {**split, "k_ptr": "*fp16", "v_ptr": "*fp16", "out_ptr": "*fp16"},
              dict(GROUP=1, BLOCK_G=1, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=64, INT8=False, DIRECT=True,
                   USE_DOT=False), 4)
r = compile(m._reduce_kernel, {"po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32", "out_ptr": "*fp16"},
            dict(HEAD_DIM=128, BLOCK_S=8), 4)
w = compile(m._write_kv_kernel, {"k_ptr": "*fp16", "v_ptr": "*fp16", "kc_ptr": "*i8", "vc_ptr": "*i8",
                                 "ks_ptr": "*fp16", "vs_ptr": "*fp16", "slot_ptr": "*i64"},
            dict(HEAD_DIM=128, BLOCK_SIZE=16, INT8=True), 1)
rw = compile(m._rope_write_kernel, {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "cos_ptr": "*fp16",
                                     "sin_ptr": "*fp16", "qo_ptr": "*fp16", "kc_ptr": "*i8", "vc_ptr": "*i8",
                                     "ks_ptr": "*fp16", "vs_ptr": "*fp16", "slot_ptr": "*i64"},
             dict(N_HEADS=32, HEAD_DIM=128, BLOCK_SIZE=16, INT8=True), 1)
print("cp.async" in k.asm["ptx"], all(len(x.asm["cubin"]) > 0 for x in (k, mha, r, w, rw)))
"""


def test_triton_kernels_compile_for_sm90_without_a_gpu():
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=root, env={**env, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the K/V tile loads are software-pipelined (cp.async) and every kernel produced a cubin
    assert done.stdout.split() == ["True", "True"], done.stdout
