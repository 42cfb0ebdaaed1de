"""The no-vendor-BLAS path (``engine.vendor_blas=false``, the 4 GB profile): its Triton kernels under the
interpreter against torch references (the W8A16 lm_head, the paged prefill attention), their sm_90 build, and the
runner's prefill + decode recorded op by op: no aten matmul or SDPA outside the quantized linears, and the same
greedy tokens as the default path. The recorder is checked to catch the default path's ops (it can fail)."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from serving.kernels.paged_attention import paged_prefill_attention
from serving.kernels.w8a16 import w8a16_linear, w8a16_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted():
    """``TRITON_INTERPRET=1`` (tests/conftest.py sets it on machines without CUDA before triton is imported); the
    kernel modules reloaded if they were built compiled."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
        pytest.importorskip("numpy")
        for name, fn in (("serving.kernels._w8a16_triton", "_w8a16_kernel"),
                         ("serving.kernels.paged_attention_triton", "_prefill_kernel")):
            mod = importlib.import_module(name)
            if type(getattr(mod, fn)).__name__ != "InterpretedFunction":
                importlib.reload(mod)
        yield


# ----------------------------------------------------------------------------------- W8A16

@pytest.mark.parametrize("m,n,k", [(1, 200, 64), (3, 64, 96), (17, 130, 256), (2, 1, 16)])
def test_w8a16_interpreted_equals_reference(interpreted, m, n, k):
    """Rows in one and two row tiles, N and K not multiples of the tiles (masked edges)."""
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) / 100
    out = w8a16_linear(x, w, s, block_n=32, block_k=32)
    torch.testing.assert_close(out, w8a16_reference(x, w, s), atol=1e-4, rtol=1e-4)


def test_w8a16_keeps_leading_dims_and_int8_linear_uses_it(interpreted):
    from serving.model import Int8Linear

    g = torch.Generator().manual_seed(0)
    lin = Int8Linear(torch.randn(70, 48, generator=g))
    x = torch.randn(2, 1, 48, generator=g)
    ref = lin(x)  # the F.linear path
    lin.use_kernel = True
    out = lin(x)
    assert out.shape == (2, 1, 70)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_w8a16_bad_arguments_are_named():
    with pytest.raises(ValueError, match="int8"):
        w8a16_linear(torch.randn(1, 8), torch.randn(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        w8a16_linear(torch.randn(1, 9), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        w8a16_linear(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))


# ----------------------------------------------------------------------------------- paged prefill

def _paged_case(n: int, kv_heads: int, group: int, head_dim: int, bs: int, int8: bool, seed: int = 0):
    from serving.kernels.paged_attention import write_kv

    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / bs)
    total = nb + 3
    shape = (total, kv_heads, bs, head_dim)
    store = torch.int8 if int8 else torch.float32
    kc, vc = torch.zeros(shape, dtype=store), torch.zeros(shape, dtype=store)
    ks = torch.zeros((*shape[:3], 1)) if int8 else None
    vs = torch.zeros((*shape[:3], 1)) if int8 else None
    phys = torch.randperm(total, generator=g)[:nb].to(torch.int32)
    pos = torch.arange(n)
    slots = phys.long()[pos // bs] * bs + pos % bs
    write_kv(torch.randn(n, kv_heads, head_dim, generator=g), torch.randn(n, kv_heads, head_dim, generator=g),
             kc, vc, ks, vs, slots, backend="torch")
    q = torch.randn(n, kv_heads * group, head_dim, generator=g)
    return q, (kc, vc, ks, vs), phys


@pytest.mark.parametrize("n,chunks,kv_heads,group,head_dim,bs,int8", [
    (45, (16, 13, 16), 2, 1, 64, 8, False),
    (45, (45,), 2, 4, 64, 16, True),
    (70, (33, 37), 1, 2, 16, 16, False),
    (40, (7, 33), 2, 3, 32, 8, True),  # a group that is not a power of two
])
def test_triton_prefill_interpreted_equals_reference(interpreted, n, chunks, kv_heads, group, head_dim, bs, int8):
    """Chunked prefill (each chunk after earlier ones, K/V read through shuffled blocks) against the torch
    gather + SDPA path, chunk by chunk; tiles smaller than a chunk and chunks shorter than a tile."""
    q, cache, table = _paged_case(n, kv_heads, group, head_dim, bs, int8)
    start = 0
    for t in chunks:
        qc = q[start:start + t]
        ref = paged_prefill_attention(qc, *cache, table, start, head_dim ** -0.5, backend="torch")
        from serving.kernels.paged_attention_triton import paged_prefill_attention_triton

        for bm, bn in ((16, 16), (32, 64)):
            out = paged_prefill_attention_triton(qc, *cache, table, start, head_dim ** -0.5, block_m=bm, block_n=bn)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(paged_prefill_attention(qc, *cache, table, start, head_dim ** -0.5,
                                                           backend="triton"), ref, atol=2e-5, rtol=2e-5)
        start += t


def test_triton_prefill_refuses_a_short_table(interpreted):
    q, cache, table = _paged_case(20, 1, 1, 16, 8, False)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        paged_prefill_attention(q, *cache, table[:2], 0, 0.25, backend="triton")


AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from serving.kernels import _w8a16_triton as w8, paged_attention_triton as pa

def compile(fn, types, constexprs, warps, stages):
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("ptr") or n in ("stride_xm", "stride_wn", "stride_om", "K", "stride_qt", "stride_kb",
                                           "stride_kh", "stride_kt", "stride_ot")}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))

a = compile(w8._w8a16_kernel, {"x_ptr": "*fp16", "w_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": "*fp16"},
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, IEEE=False), 4, 3)
fp = {n: "*fp16" for n in ("q_ptr", "out_ptr", "ks_ptr", "vs_ptr")}
b = compile(pa._prefill_kernel, {**fp, "k_ptr": "*i8", "v_ptr": "*i8", "bt_ptr": "*i32", "qk_scale": "fp32"},
            dict(GROUP=1, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=32, BLOCK_N=64, INT8=True, IEEE=False), 4, 2)
c = compile(pa._prefill_kernel, {**fp, "k_ptr": "*fp16", "v_ptr": "*fp16", "bt_ptr": "*i32", "qk_scale": "fp32"},
            dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=32, BLOCK_N=64, INT8=False, IEEE=False), 4, 2)
print(all(len(x.asm["cubin"]) > 0 for x in (a, b, c)))
"""


def test_own_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts programs the compiler rejects (tl.dot shapes, dtypes): CI's check that the GPU
    build of both kernels works (a fresh process: TRITON_INTERPRET changes what triton.jit builds)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True"], done.stdout


# ----------------------------------------------------------------------------------- the runner, op by op

# aten ops that reach a vendor BLAS / attention library on CUDA (what linear, matmul and SDPA decompose into)
BANNED = {"mm", "bmm", "addmm", "addmv", "mv", "matmul", "linear", "baddbmm", "addbmm", "dot", "einsum"}


def _banned(name: str) -> bool:
    return name in BANNED or "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


class OpRecorder(TorchDispatchMode):
    """Every aten op called while no quantized linear (the layers' projections: GPTQ kernels on GPU, plain
    ``nn.Linear`` in the tiny CPU model, excluded by module hooks) is running."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.depth, self.ops = 0, []
        self.handles = []
        for mod in model.model.layers.modules():
            if isinstance(mod, nn.Linear):
                self.handles.append(mod.register_forward_pre_hook(self._enter))
                self.handles.append(mod.register_forward_hook(self._leave))

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.depth == 0:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def banned(self) -> list[str]:
        return sorted({op for op in self.ops if _banned(op)})

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _greedy(model_path: Path, vendor_blas: bool, quant: bool, prompts: list[list[int]], steps: int,
            chunk: int = 24, bs: int = 16, lm_head_int4: bool = False, packed: bool = False):
    """Chunked prefill of each prompt, then ``steps`` batched greedy decode steps, through ``LlamaRunner`` (the
    int8 lm_head on both paths) under the op recorder; ``packed``: each step through ``decode_packed`` from the
    engine's packed int32 rows (what the CUDA graphs capture: its columns are strided views). Returns (tokens per
    prompt, banned ops seen, all ops)."""
    from transformers import AutoModelForCausalLM

    from serving.kv_cache import KVBlocks
    from serving.runner import LlamaRunner

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    dev = torch.device("cpu")
    runner = LlamaRunner(model, dev, embed_on_host=False, lm_head_int8=not lm_head_int4, vendor_blas=vendor_blas,
                         lm_head_int4=lm_head_int4)
    per_seq = -(-(max(map(len, prompts)) + steps) // bs)
    runner.cache = KVBlocks(len(runner.layers), 1 + per_seq * len(prompts), bs, runner.kv_heads, runner.head_dim,
                            runner.dtype, dev, quant)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))[::-1] for i in range(len(prompts))]  # shuffled
    rec = OpRecorder(model)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode(), rec:
        for i, p in enumerate(prompts):
            for s in range(0, len(p), chunk):
                logits = runner.prefill(p[s:s + chunk], tables[i], s, want_logits=s + chunk >= len(p))
            out[i].append(int(logits.argmax()))
        for _ in range(steps):
            pos = [len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True)]
            h = runner.embed(torch.tensor([o[-1] for o in out])).unsqueeze(1)
            slots = torch.tensor([t[q // bs] * bs + q % bs for t, q in zip(tables, pos, strict=True)])
            if packed:
                rows = [[o[-1], q, s, q + 1, *t] for o, q, s, t in zip(out, pos, slots.tolist(), tables, strict=True)]
                logits = runner.decode_packed(torch.tensor(rows, dtype=torch.int32), max(pos) + 1)
            else:
                logits = runner.decode(h, torch.tensor(pos), slots, torch.tensor(tables, dtype=torch.int32),
                                       torch.tensor([q + 1 for q in pos], dtype=torch.int32), max(pos) + 1)
            for o, row in zip(out, logits.argmax(-1).tolist(), strict=True):
                o.append(row)
    rec.remove()
    return out, rec.banned(), set(rec.ops)


@pytest.mark.parametrize("quant", [False, True], ids=["fp32-kv", "int8-kv"])
def test_runner_without_vendor_blas_calls_no_matmul_or_sdpa_and_decodes_the_same(interpreted, tiny_model, quant):
    """Two prompts of 40 and 19 tokens (chunks of 24: a second chunk after a first), 12 batched decode steps
    across a block boundary. Default path: the recorder sees the lm_head's linear and SDPA, so it can
    fail; no-vendor-BLAS path: none of them, the same greedy tokens."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (40, 19)]
    ref, ref_banned, _ = _greedy(tiny_model, True, quant, prompts, steps=12)
    assert ref_banned and any("scaled_dot_product" in op for op in ref_banned), ref_banned
    assert {"mm", "addmm", "linear"} & set(ref_banned), ref_banned
    own, own_banned, own_ops = _greedy(tiny_model, False, quant, prompts, steps=12)
    assert own_banned == [], own_banned
    assert "embedding" in own_ops  # the recorder saw the run
    assert own == ref


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_from_packed_rows_without_vendor_blas_decodes_the_same(interpreted, tiny_model, batch):
    """The engine's entry point: at batch 1 the packed rows' columns (slot, context length) are size-1 views with
    the row's stride, which the kernels' contiguity checks must take (they refused them once, on the H200)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (21, 9)[:batch]]
    ref, _, _ = _greedy(tiny_model, True, True, prompts, steps=6, packed=True)
    own, own_banned, _ = _greedy(tiny_model, False, True, prompts, steps=6, packed=True)
    assert own_banned == [], own_banned
    assert own == ref


def test_decode_rotary_and_kv_write_take_the_fused_kernel_where_triton_kernels_run(tiny_model):
    """Without vendor BLAS (on any device, as the decode attention kernel) the decode layers' rotary + K/V write
    piece is the one-launch Triton kernel (``rope_write_kv``), the norms and the gate Triton launches too until
    engine.compile compiles them, and prefill takes ``_prefill_kernels`` (the same kernels): the greedy comparison
    above ran all of them interpreted. The default CPU path keeps the torch pieces, and engine.compile leaves the
    rotary kernel uncompiled."""
    from transformers import AutoModelForCausalLM

    import serving.runner as sr

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    own = sr.LlamaRunner(model, torch.device("cpu"), False, lm_head_int8=True, vendor_blas=False)
    assert own.rope_kernel and own.fused["rope_write"] is sr._rope_write_triton
    assert own.fused["mlp_in"] is sr._mlp_in_triton and own.fused["gate"] is sr._gate_triton  # (uncompiled)
    assert own.compile_decode() and own.fused["rope_write"] is sr._rope_write_triton  # (compiled lazily: no build)
    assert own.fused["mlp_in"] is not sr._mlp_in
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    default = sr.LlamaRunner(model, torch.device("cpu"), False, lm_head_int8=True)
    assert not default.rope_kernel and default.fused["rope_write"] is sr._rope_write


def test_int4_lm_head_without_vendor_blas_calls_no_matmul_and_decodes_the_same(interpreted, tiny_model):
    """The 4-bit lm_head (W4A16 GEMV, rows in chunks of 8) on both paths: the same greedy tokens, no matmul or SDPA
    without vendor BLAS (with it, SDPA is still seen)."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (30, 9)]
    ref, ref_banned, _ = _greedy(tiny_model, True, True, prompts, steps=6, lm_head_int4=True)
    assert any("scaled_dot_product" in op for op in ref_banned), ref_banned
    own, own_banned, _ = _greedy(tiny_model, False, True, prompts, steps=6, lm_head_int4=True)
    assert own_banned == [] and own == ref


@pytest.mark.parametrize("m", [1, 3, 11])
def test_int4_lm_head_equals_its_dequantized_weight_and_stays_near_fp(interpreted, m):
    """11 rows run as 8 + 3 through the GEMV (never the dequantize + cuBLAS path); the RTN g128 weight is within
    half a step of the fp one."""
    from serving.kernels.reference import gptq_linear
    from serving.quant_linear import int4_lm_head, quantize_rtn_int4

    g = torch.Generator().manual_seed(m)
    w = torch.randn(72, 256, generator=g) * 0.05
    x = torch.randn(m, 256, generator=g)
    head = int4_lm_head(w, torch.device("cpu"))
    qweight, qzeros, scales, gs = quantize_rtn_int4(w)
    assert gs == 128 and head.config_for(m).split_k == 1
    ref = gptq_linear(x, qweight, qzeros, scales, None)
    torch.testing.assert_close(head(x), ref, atol=1e-4, rtol=1e-4)
    from serving.kernels.reference import dequantize

    step = scales.float().repeat_interleave(gs, dim=0)  # [K, N]
    # half a step, plus the fp16 rounding of the scale times at most 7 steps (2**-11 relative each)
    assert ((dequantize(qweight, qzeros, scales, None) - w.t()).abs() <= step * (0.5 + 7 * 2**-11)).all()


def test_vendor_blas_off_refuses_what_it_cannot_replace(tiny_model):
    from transformers import AutoModelForCausalLM

    from serving.errors import EngineError
    from serving.runner import LlamaRunner

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with pytest.raises(EngineError, match="lm_head_int4"):
        LlamaRunner(model, torch.device("cpu"), False, lm_head_int8=False, vendor_blas=False)
    with pytest.raises(EngineError, match="attention_kernel=torch"):
        LlamaRunner(model, torch.device("cpu"), False, lm_head_int8=True, paged_kernel=False, vendor_blas=False)


def test_rope_without_matmul_equals_the_model_rotary(tiny_model):
    from transformers import AutoModelForCausalLM

    from serving.runner import rope_cos_sin

    rot = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).model.rotary_emb
    pos = torch.tensor([[0, 5, 17, 511], [3, 3, 100, 200]])
    x = torch.zeros(1, dtype=torch.float16)
    cos, sin = rot(x, pos)
    mine = rope_cos_sin(rot.inv_freq, rot.attention_scaling, pos, torch.float16)
    assert torch.equal(mine[0], cos) and torch.equal(mine[1], sin)


def test_engine_on_cpu_keeps_torch_matmul_and_says_so(tiny_model):
    """``engine.vendor_blas=false`` is a CUDA memory setting: a CPU engine keeps torch's path (the Triton kernels
    would run interpreted) and reports it; it still needs nothing else to start."""
    from serving.engine import EngineConfig, LLMEngine
    from serving.sampler import SamplingParams

    eng = LLMEngine(tiny_model, EngineConfig(device="cpu", vendor_blas=False, lm_head_int8=True, warmup=False,
                                             max_model_len=64))
    eng.load_and_start()
    try:
        assert eng.info["vendor_blas"] is True and eng.runner.vendor_blas is True
        names = [s[0] for s in eng.memory.steps]
        assert names[:3] == ["weights", "lm_head", "first_prefill"] and "fitted" in names
        done, got = [], []
        eng.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                        lambda o: (got.append(o), o.finish_reason and done.append(1)))
        for _ in range(200):
            if done:
                break
            time.sleep(0.05)
        assert done and got[-1].completion_tokens == 3
    finally:
        eng.shutdown()


def test_lm_head_int8_and_int4_exclude_each_other():
    from pydantic import ValidationError

    from serving.config import EngineConfig

    with pytest.raises(ValidationError, match="lm_head_int8 and lm_head_int4"):
        EngineConfig(lm_head_int8=True, lm_head_int4=True)
    assert EngineConfig(lm_head_int4=True).lm_head_int4


def test_lm_head_quality_bench_orders_the_variants(tiny_model, tmp_path):
    """serving.bench_lm_head on the tiny model and two real HH texts: fp32 agrees with itself, and the 4-bit
    lm_head drifts further from it than the int8 one (the README's SmolLM2 figures come from the same code)."""
    import json

    from serving import bench_lm_head

    out = tmp_path / "q.json"
    assert bench_lm_head.main(["--model", str(tiny_model), "--texts", "2", "--max-tokens", "24",
                               "--out", str(out)]) == 0
    v = json.loads(out.read_text())["variants"]
    assert v["fp32"]["top1_agreement_with_fp32"] == 1.0 and v["fp32"]["mean_kl_from_fp32"] == 0.0
    int4 = next(k for k in v if k.startswith("int4_rtn_g") and k != "int4_rtn_g32")
    assert 0 < v["int8_per_row"]["mean_kl_from_fp32"] < v[int4]["mean_kl_from_fp32"]


# aten ops that launch no kernel on CUDA (metadata only, or an allocation)
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand", "unsqueeze",
             "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "detach", "detach_", "alias",
             "unbind", "narrow", "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "unflatten",
             "flatten", "contiguous", "new_empty", "new_empty_strided"}


class LayerOps(OpRecorder):
    """Kernel-launching aten ops (``NO_LAUNCH`` left out) and the project's Triton launches while the runner walks
    its decoder layers (``watch`` replaces ``runner.layers``: recording starts with the loop and ends with it),
    outside the projections (``OpRecorder``'s nn.Linear hooks) and outside the Triton calls (the interpreter's own
    torch ops)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.active, self.aten, self.triton = False, 0, 0

    def watch(self, layers: list) -> list:
        rec = self

        class Watched(list):
            def __iter__(self):
                rec.active = True
                yield from list.__iter__(self)
                rec.active = False
        return Watched(layers)

    def launch(self, fn):
        def run(*a, **k):
            if self.active and self.depth == 0:
                self.triton += 1
            self.depth += 1
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
        return run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and self.depth == 0 and func.overloadpacket.__name__ not in NO_LAUNCH:
            self.aten += 1
        return func(*args, **(kwargs or {}))


def test_prefill_and_decode_launch_counts_per_layer(interpreted, tiny_model, monkeypatch):
    """Kernels a decoder layer launches outside its projections, counted on CPU: aten ops that launch a kernel
    on CUDA (views and allocations left out) plus the project's Triton launches (at their Python entry points).
    HF's modules (the default CPU path) against the one-launch pieces the runner takes where the Triton kernels
    run (no vendor BLAS here; on CUDA by default): one 24-token prefill chunk and one decode step, uncompiled.
    The figures are printed as JSON (``pytest -s``); the asserts keep them from creeping back."""
    import json

    from transformers import AutoModelForCausalLM

    import serving.kernels.paged_attention as pa
    import serving.runner as sr
    from serving.kv_cache import KVBlocks

    figures = {}
    for vendor_blas in (True, False):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
        runner = sr.LlamaRunner(model, torch.device("cpu"), False, lm_head_int8=True, vendor_blas=vendor_blas)
        rec = LayerOps(model)
        with monkeypatch.context() as mp:
            for mod, names in ((sr, ("add_rms_norm", "silu_mul")),
                               (pa, ("rope_write_kv", "paged_prefill_attention"))):
                for name in names:
                    mp.setattr(mod, name, rec.launch(getattr(mod, name)))
            if runner.decode_kernel is not None:
                runner.decode_kernel = rec.launch(runner.decode_kernel)
            runner.layers = rec.watch(runner.layers)
            runner.cache = KVBlocks(len(runner.layers), 8, 16, runner.kv_heads, runner.head_dim, runner.dtype,
                                    torch.device("cpu"), True)
            ids = torch.randint(5, 300, (24,), generator=torch.Generator().manual_seed(0)).tolist()
            counts = {}
            for phase in ("prefill", "decode"):
                rec.aten = rec.triton = 0
                with torch.inference_mode(), rec:
                    if phase == "prefill":
                        runner.prefill(ids, [1, 2], 0, want_logits=False)
                    else:
                        h = runner.embed(torch.tensor([7])).unsqueeze(1)
                        runner.decode(h, torch.tensor([24]), torch.tensor([2 * 16 + 8]),
                                      torch.tensor([[1, 2]], dtype=torch.int32),
                                      torch.tensor([25], dtype=torch.int32), 25)
                layers = len(runner.layers)
                counts[phase] = {"aten_per_layer": rec.aten / layers, "triton_per_layer": rec.triton / layers,
                                 "per_layer": (rec.aten + rec.triton) / layers}
        rec.remove()
        figures["hf_modules" if vendor_blas else "one_launch_pieces"] = counts
    print(json.dumps({"layers": layers, **figures}))
    hf, own = figures["hf_modules"], figures["one_launch_pieces"]
    assert own["prefill"]["aten_per_layer"] == 0 and own["decode"]["aten_per_layer"] == 0, figures
    assert own["prefill"]["per_layer"] <= 5 and own["decode"]["per_layer"] <= 5, figures  # (+ the projections)
    assert hf["prefill"]["per_layer"] >= 10 * own["prefill"]["per_layer"], figures
