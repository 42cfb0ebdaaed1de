"""The W4A16 Triton kernels (serving/kernels/w4a16.py) under Triton's interpreter (TRITON_INTERPRET=1, CPU)
against the dequantized torch reference, and greedy tokens of a tiny act-order GPTQ checkpoint with its
layers swapped for ``W4A16Linear`` against the same model with the reference weights. Shapes are tiny: the
interpreter runs about 20 programs a second here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from serving.kernels import reference as ref
from serving.kernels import w4a16
from serving.kernels.w4a16 import GemvConfig, KernelError, SplitKWorkspace
from serving.quant_linear import W4A16Linear, swap_gptq_linears

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # fp16 output: one rounding of |y| (2**-11 relative) on top of fp32 accumulation
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    assert err <= tol * scale + 1e-6, (err, scale)


# K, N, group size, sym, act-order, rows, config; every group size, both zero-point kinds, act-order, 1..8 rows,
# K not a multiple of 256 (padded chunk), N not a multiple of the tile, split-K with uneven slices
CASES = [
    (256, 64, 128, True, False, 1, GemvConfig(block_n=32)),
    (200, 77, 32, False, False, 2, GemvConfig(block_n=16, split_k=1, scale_w=True)),
    (512, 40, 64, True, True, 3, GemvConfig(block_n=16, split_k=2)),
    (328, 77, 32, False, True, 4, GemvConfig(block_n=32, split_k=2, scale_w=True)),
    (768, 33, 128, False, True, 5, GemvConfig(block_n=64, split_k=3)),
    (600, 50, -1, False, False, 6, GemvConfig(block_n=16, split_k=2)),
    (1024, 24, 128, True, True, 7, GemvConfig(block_n=32, split_k=4, scale_w=True)),
    (264, 96, 64, False, False, 8, GemvConfig(block_n=64, split_k=2)),
    (1280, 16, 256, False, True, 1, GemvConfig(block_n=16, split_k=16)),
    (2048, 32, 512, False, False, 2, GemvConfig(block_n=32, split_k=4)),
    (520, 48, 64, False, True, 3, GemvConfig(block_n=16, split_k=2, dot=True, prefetch=True)),
    (1288, 40, 128, False, True, 1, GemvConfig(block_n=16, split_k=2, prefetch=True)),
    (784, 24, 64, True, False, 6, GemvConfig(block_n=16, split_k=1, scale_w=True, prefetch=True)),
    (256, 40, 32, True, False, 1, GemvConfig(block_n=32, dot=True)),
    (600, 64, -1, False, False, 8, GemvConfig(block_n=64, split_k=3, dot=True)),
    # kernel 2: per-row accumulators, unit-scale nibbles, 1 or 2 chunks per iteration (odd slices: a padded slot)
    (256, 64, 128, True, False, 1, GemvConfig(block_n=32, kernel=2)),
    (328, 77, 32, False, True, 1, GemvConfig(block_n=32, split_k=2, kernel=2, unroll=2)),
    (520, 48, 64, False, True, 2, GemvConfig(block_n=16, split_k=2, kernel=2, unroll=2)),
    (768, 33, 128, False, False, 3, GemvConfig(block_n=16, split_k=1, kernel=2, unroll=2)),
    (1024, 24, 128, True, True, 4, GemvConfig(block_n=32, split_k=4, kernel=2)),
    (600, 50, -1, False, False, 5, GemvConfig(block_n=16, split_k=3, kernel=2, unroll=2)),
    (784, 24, 64, True, False, 7, GemvConfig(block_n=16, split_k=1, kernel=2, scale_w=True)),
    (1280, 16, 256, False, True, 8, GemvConfig(block_n=16, split_k=2, kernel=2, unroll=2)),
    (2048, 32, 512, False, False, 1, GemvConfig(block_n=32, split_k=3, kernel=2, unroll=2, scale_w=True)),
    # kernel 2 through tl.dot (rows padded to 16), 1..8 rows
    (328, 77, 32, False, True, 1, GemvConfig(block_n=32, split_k=2, kernel=2, dot=True)),
    (520, 48, 64, False, True, 3, GemvConfig(block_n=16, split_k=2, kernel=2, unroll=2, dot=True)),
    (600, 50, -1, False, False, 8, GemvConfig(block_n=16, split_k=1, kernel=2, dot=True)),
    (1024, 24, 128, True, True, 6, GemvConfig(block_n=32, split_k=3, kernel=2, unroll=2, dot=True)),
    # kernel 3: nibble pairs as fp16 (0x64006400), fp16 dequantization, tl.dot; every group size, 1..8 rows
    (256, 64, 128, True, False, 1, GemvConfig(block_n=32, kernel=3, dot=True)),
    (328, 77, 32, False, True, 1, GemvConfig(block_n=32, split_k=2, kernel=3, dot=True)),
    (520, 48, 64, False, True, 2, GemvConfig(block_n=16, split_k=2, kernel=3, dot=True)),
    (768, 33, 128, False, False, 3, GemvConfig(block_n=16, split_k=1, kernel=3, dot=True)),
    (1024, 24, 128, True, True, 4, GemvConfig(block_n=32, split_k=4, kernel=3, dot=True)),
    (600, 50, -1, False, False, 5, GemvConfig(block_n=16, split_k=3, kernel=3, dot=True)),
    (784, 24, 64, True, False, 7, GemvConfig(block_n=16, split_k=1, kernel=3, dot=True)),
    (1280, 16, 256, False, True, 8, GemvConfig(block_n=16, split_k=2, kernel=3, dot=True)),
    (2048, 32, 512, False, False, 6, GemvConfig(block_n=32, split_k=3, kernel=3, dot=True)),
    # kernel 3 at one row through packed fp16 FMAs (the scale per nibble below groups of 128, after the chunk's
    # products from 128 on): every group size, act-order, odd shapes, split-K
    (256, 64, 128, True, False, 1, GemvConfig(block_n=32, kernel=3)),
    (328, 77, 32, False, True, 1, GemvConfig(block_n=32, split_k=2, kernel=3)),
    (520, 48, 64, False, True, 1, GemvConfig(block_n=16, split_k=2, kernel=3)),
    (1024, 24, 128, True, True, 1, GemvConfig(block_n=32, split_k=4, kernel=3)),
    (600, 50, -1, False, False, 1, GemvConfig(block_n=16, split_k=3, kernel=3)),
    (1280, 16, 256, False, True, 1, GemvConfig(block_n=16, split_k=2, kernel=3)),
    (2048, 32, 512, False, False, 1, GemvConfig(block_n=32, split_k=3, kernel=3)),
]


@pytest.mark.parametrize("k, n, gs, sym, act, m, cfg", CASES)
def test_gemv_matches_dequantized_reference(k, n, gs, sym, act, m, cfg):
    t = ref.random_gptq(k, n, gs, sym, act, seed=k + n)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], gs)
    assert (packed.perm is not None) == act
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    ws = SplitKWorkspace("cpu", n)
    _check(w4a16.gemv(x, packed, cfg, ws), ref.gptq_linear(x, **t), torch.float16)
    assert ws.counters.abs().sum() == 0  # the last slice of every tile reset its counter


def test_fp32_activations_are_exact_up_to_accumulation_order():
    """With fp32 in and out the only difference left is summation order: a wrong nibble, zero point or group
    would be off by a whole quantization step."""
    t = ref.random_gptq(520, 72, 32, False, True, seed=3)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 32)
    x = torch.randn(3, 520)
    for cfg in (GemvConfig(block_n=32, split_k=3), GemvConfig(block_n=16, scale_w=True),
                GemvConfig(block_n=16, split_k=2, kernel=2, unroll=2)):
        _check(w4a16.gemv(x, packed, cfg, SplitKWorkspace("cpu", 72)), ref.gptq_linear(x, **t), torch.float32)
    # kernel 3's one-row FMA loop multiplies fp32 rows in fp32 (its packed fp16 FMAs are for fp16 rows only);
    # its weights are dequantized in fp16, as Marlin's are: one fp16 rounding of each weight, fp16's tolerance
    _check(w4a16.gemv(x[:1], packed, GemvConfig(block_n=16, split_k=2, kernel=3), SplitKWorkspace("cpu", 72)),
           ref.gptq_linear(x[:1], **t), torch.float16)


def test_split_k_is_deterministic_and_agrees_with_one_slice():
    t = ref.random_gptq(1024, 48, 64, False, False, seed=5)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 64)
    x = torch.randn(2, 1024)
    ws = SplitKWorkspace("cpu", 48)
    a = w4a16.gemv(x, packed, GemvConfig(block_n=16, split_k=4), ws)
    b = w4a16.gemv(x, packed, GemvConfig(block_n=16, split_k=4), ws)
    one = w4a16.gemv(x, packed, GemvConfig(block_n=16, split_k=1), ws)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, one, rtol=1e-5, atol=1e-5)
    c = w4a16.gemv(x, packed, GemvConfig(block_n=16, split_k=4, kernel=2, unroll=2), ws)
    assert torch.equal(c, w4a16.gemv(x, packed, GemvConfig(block_n=16, split_k=4, kernel=2, unroll=2), ws))
    torch.testing.assert_close(c, one, rtol=1e-5, atol=1e-5)


def test_dequantize_path_matches_the_reference(monkeypatch):
    monkeypatch.setattr(w4a16, "DEQUANT_CHUNK_ELEMS", 32 * 512)  # 32 outputs at a time: three slices of 70
    t = ref.random_gptq(328, 70, 32, False, True, seed=7)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 32)
    x = torch.randn(14, 328).half()
    _check(w4a16.matmul_dequant(x, packed, 32), ref.gptq_linear(x, **t), torch.float16)


def test_long_inputs_take_the_gemm(monkeypatch):
    from serving.kernels import w4a16_gemm
    calls = []
    real = w4a16_gemm.matmul
    monkeypatch.setattr(w4a16_gemm, "matmul", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    t = ref.random_gptq(328, 70, 32, False, True, seed=7)
    lin = W4A16Linear.from_tensors(**t, group_size=32, bias=torch.randn(70))
    lin.gemm_block_n = 32
    x = torch.randn(2, 7, 328).half()  # 14 rows > 8
    got = lin(x)
    assert got.shape == (2, 7, 70)
    _check(got, ref.gptq_linear(x, **t, bias=lin.bias), torch.float16)
    _check(lin(x[:1, :3]), ref.gptq_linear(x[:1, :3], **t, bias=lin.bias), torch.float16)  # gemv, same bias
    assert calls == [(14, 328)]  # the 14-row call went to the GEMM, the 3-row one to the GEMV


def test_fused_layers_equal_the_separate_ones():
    parts = [ref.random_gptq(256, n, 64, False, False, seed=n) for n in (64, 32, 32)]
    mods = [W4A16Linear.from_tensors(**t, group_size=64) for t in parts]
    fused = W4A16Linear.fuse(mods)
    x = torch.randn(1, 256)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], -1), rtol=1e-5, atol=1e-5)
    from serving.model import fuse_linears  # the runner's --fuse-projections path (checks the fusion at load)

    via_runner = fuse_linears(mods)
    assert isinstance(via_runner, W4A16Linear) and via_runner.out_features == 128
    torch.testing.assert_close(via_runner(x), fused(x), rtol=0, atol=0)
    other = W4A16Linear.from_tensors(**ref.random_gptq(256, 32, 64, True, True, seed=1), group_size=64)
    with pytest.raises(KernelError, match="permutation"):
        W4A16Linear.fuse([mods[0], other])


def test_unsupported_layouts_are_refused_with_a_reason():
    t = ref.random_gptq(512, 16, 64, True, False)
    with pytest.raises(KernelError, match="multiple of 256"):
        w4a16.repack(t["qweight"], t["qzeros"], t["scales"], torch.arange(512) // 16, 16)
    bad = t["g_idx"].clone()
    bad[:3] = 3  # group 3 now has 67 members: not a GPTQ act-order permutation
    with pytest.raises(KernelError, match="equal groups"):
        w4a16.repack(t["qweight"], t["qzeros"], t["scales"], bad, 64)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 64)
    with pytest.raises(KernelError, match="features"):
        w4a16.gemv(torch.randn(1, 128), packed, GemvConfig())
    with pytest.raises(KernelError, match="SplitKWorkspace"):
        w4a16.gemv(torch.randn(1, 512), packed, GemvConfig(split_k=2))
    with pytest.raises(KernelError, match="unrolls 1 or 2"):
        w4a16.gemv(torch.randn(1, 512), packed, GemvConfig(kernel=2, unroll=3))
    with pytest.raises(KernelError, match="no GEMV kernel 4"):
        w4a16.gemv(torch.randn(1, 512), packed, GemvConfig(kernel=4))
    with pytest.raises(KernelError, match="kernel 3 without tl.dot multiplies one row, not 2"):
        w4a16.gemv(torch.randn(2, 512), packed, GemvConfig(kernel=3))


def test_config_table_round_trip_and_lookup(tmp_path: Path):
    table = {w4a16.config_key(64, 256, 2): GemvConfig(block_n=64, split_k=1, num_warps=8, num_stages=3,
                                                      scale_w=True)}
    path = tmp_path / "cfg.json"
    w4a16.save_config_table(path, table, {"device": "test"})
    assert json.loads(path.read_text())["meta"] == {"device": "test"}
    loaded = w4a16.load_config_table(path)
    assert loaded == table
    lin = W4A16Linear.from_tensors(**ref.random_gptq(256, 64, 64), group_size=64, configs=loaded)
    assert lin.config_for(2) == table[w4a16.config_key(64, 256, 2)]
    assert lin.config_for(1) == w4a16.default_config(64, 256, 1)  # no entry: the default
    assert [w4a16.bucket(m) for m in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("rows", [1, 4])
def test_default_configs_compile_for_hopper_without_spills(rows):
    """Triton compiles the GEMV for sm_90 here (its wheel carries ptxas): no local memory, and the chunk loop
    stays near the unpack-and-FMA count it was designed for (5.4 SASS instructions per weight at one row,
    6.7 through tl.dot; ~3 is the floor: LOP3, FADD, FFMA)."""
    import os
    import subprocess
    import sys

    cfg = w4a16.default_config(4096, 4096, rows)
    args = ["--rows", str(rows), "--block-n", str(cfg.block_n), "--num-warps", str(cfg.num_warps)]
    args += ["--dot"] * cfg.dot + ["--split"] * (cfg.split_k > 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, in its own process
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "serving.kernels.sass", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats["local_bytes"] == 0 and stats["registers"] <= 255, stats
    assert 3 <= stats["instructions_per_weight"] <= 8, stats


def _sass(args: list[str]) -> dict:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, in its own process
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "serving.kernels.sass", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rows", [1, 2])
def test_kernel2_compiles_for_hopper_with_fewer_instructions_than_kernel1(rows):
    """Kernel 2's CUDA-core loop on the tile the H200 table picked for qkv at one and two rows (32 outputs, 2
    warps, split-K): no spills, no shared-memory round trips, and fewer SASS instructions per weight than
    kernel 1 on the same tile (5.38 -> 5.12 at one row; 7.9 -> 7.2 at two, where kernel 1's 3-D tiles
    synchronize through shared memory). GPU timing decides between them (tests/gpu/bench_w4a16.py)."""
    args = ["--rows", str(rows), "--block-n", "32", "--num-warps", "2", "--split"] + ["--scale-w"] * (rows > 1)
    v1, v2 = _sass(args + ["--kernel", "1"]), _sass(args + ["--kernel", "2"])
    assert v2["local_bytes"] == 0 and v2["registers"] <= 255, v2
    assert v2["instructions_per_weight"] < v1["instructions_per_weight"], (v1, v2)
    assert v2["top"].get("BAR.SYNC.DEFER_BLOCKING", 0) == 0, v2


def test_kernel2_dot_keeps_rows_nearly_free_on_hopper():
    """Kernel 2's tl.dot loop at 128 outputs, 4 warps (wgmma on sm_90): the instructions per weight are the same
    for 1 and 8 rows (the rows ride on the tensor cores) and below kernel 1's tl.dot loop on its default tile
    (6.7 there: the ``* 16**-e`` FMUL per weight is gone; 4.2 measured with triton 3.9)."""
    args = ["--block-n", "128", "--num-warps", "4", "--split", "--dot", "--kernel", "2"]
    one, eight = _sass(args + ["--rows", "1"]), _sass(args + ["--rows", "8"])
    v1 = _sass(["--block-n", "64", "--num-warps", "4", "--split", "--dot", "--kernel", "1", "--rows", "4"])
    for st in (one, eight):
        assert st["local_bytes"] == 0 and st["registers"] <= 255, st
        assert st["instructions_per_weight"] < 0.8 * v1["instructions_per_weight"], (st, v1)
    assert eight["instructions_per_weight"] <= 1.05 * one["instructions_per_weight"], (one, eight)


def test_kernel3_unpacks_nibble_pairs_in_fewer_instructions_than_kernel2_dot():
    """Kernel 3 (nibble pairs ORed into fp16 two at a time, fp16 dequantization, wgmma with the weight tile in
    registers) at 128 outputs, 4 warps, sm_90: no spills, packed fp16 arithmetic (HMUL2) instead of kernel 2's
    FADD + F2FP per weight, and fewer SASS instructions per weight than kernel 2's tl.dot loop on the same tile
    (3.84 against 4.24 with triton 3.9, 3.52 against 4.26 with triton 3.6; 3.97 with triton 3.9 when it read
    16-bit halves, which ptxas unpacked one at a time and re-packed); at 8 rows the same count (the rows ride on
    the tensor cores)."""
    args = ["--block-n", "128", "--num-warps", "4", "--split", "--dot"]
    v3, v3_8 = _sass(args + ["--kernel", "3", "--rows", "1"]), _sass(args + ["--kernel", "3", "--rows", "8"])
    v2 = _sass(args + ["--kernel", "2", "--rows", "1"])
    for st in (v3, v3_8):
        assert st["local_bytes"] == 0 and st["registers"] <= 255, st
        assert st["top"].get("HMUL2", 0) > 0 and "F2FP.F16.F32.PACK_AB" not in st["top"], st
    assert v3["instructions_per_weight"] <= 0.92 * v2["instructions_per_weight"], (v2, v3)
    assert v3_8["instructions_per_weight"] <= 1.05 * v3["instructions_per_weight"], (v3, v3_8)


def test_kernel3_one_row_fma_loop_beats_kernel2_on_its_tile():
    """Kernel 3 at one row without tl.dot (packed fp16 FMAs; the scale after each chunk's products at g128) on
    the tile the H200 table gives kernel 2 at one row (32 outputs, 2 warps, split-K), sm_90: no spills and
    at most 0.85x kernel 2's instructions per weight (4.01 against 5.23 with triton 3.9, 4.14 against 5.12 with
    triton 3.6);
    its act-order build compiles too. GPU timing decides (tests/gpu/bench_w4a16.py puts it in the grid)."""
    args = ["--rows", "1", "--block-n", "32", "--num-warps", "2", "--split"]
    v3, v2 = _sass(args + ["--kernel", "3"]), _sass(args + ["--kernel", "2", "--unroll", "2"])
    assert v3["local_bytes"] == 0 and v3["registers"] <= 255, v3
    assert v3["instructions_per_weight"] <= 0.85 * v2["instructions_per_weight"], (v2, v3)
    perm = _sass(args + ["--kernel", "3", "--act-order"])
    assert perm["local_bytes"] == 0, perm


@pytest.mark.parametrize("kernel", [1, 2, 3])
@pytest.mark.parametrize("group_j", [1, 4])
def test_act_order_kernels_compile_for_hopper(kernel, group_j):
    """Every kernel's act-order build (the g_idx gather of the activations) for sm_90 at 4 rows, g32 and g128.
    Kernel 3 joined two gathered tiles once, which compiled with triton 3.9 but crashed triton 3.6's
    TritonGPUOptimizeDotOperands pass on the H200 (its GPU test); it now gathers once in the tile's order
    (checked here against triton 3.6 too: ``PYTHONPATH=<triton 3.6> python -m serving.kernels.sass --kernel 3
    --dot --act-order --rows 3``)."""
    args = ["--rows", "4", "--block-n", "64", "--num-warps", "4", "--split", "--act-order", "--group-j",
            str(group_j), "--kernel", str(kernel)] + ["--dot"] * (kernel != 2) + ["--unroll", "2"] * (kernel == 2)
    st = _sass(args)
    assert st["local_bytes"] == 0 and st["registers"] <= 255, st


# -- a tiny GPTQ checkpoint (act-order, asymmetric) through GPTQModel + the swap, greedy vs reference weights

H, INTER, LAYERS, GS = 256, 512, 2, 64


def _make_checkpoint(out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from conftest import make_tokenizer
    from safetensors.torch import save_file

    tok = make_tokenizer(out)
    v = len(tok)
    gen = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(v, H, generator=gen).half(),
         "lm_head.weight": (torch.randn(v, H, generator=gen) * 0.2).half(), "model.norm.weight": torch.ones(H).half()}
    seed = 0
    for n in range(LAYERS):
        p = f"model.layers.{n}"
        shapes = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H // 2), "self_attn.v_proj": (H, H // 2),
                  "self_attn.o_proj": (H, H), "mlp.gate_proj": (H, INTER), "mlp.up_proj": (H, INTER),
                  "mlp.down_proj": (INTER, H)}
        for name, (i, o) in shapes.items():
            seed += 1
            for key, val in ref.random_gptq(i, o, GS, sym=False, act_order=True, seed=seed).items():
                t[f"{p}.{name}.{key}"] = val
        t[f"{p}.input_layernorm.weight"] = torch.ones(H).half()
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(H).half()
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    # GPTQModel loads asymmetric v1 checkpoints only from writers it knows store zero points minus one
    q = {"bits": 4, "group_size": GS, "desc_act": True, "sym": False, "quant_method": "gptq",
         "checkpoint_format": "gptq", "meta": {"quantizer": ["gptqmodel:7.7.0"]}}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
           "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": v,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "torch_dtype": "float16",
           "tie_word_embeddings": False, "quantization_config": q}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(json.dumps(q))
    return out, t


def _reference_model(path: Path, tensors: dict[str, torch.Tensor]):
    """The same model as a plain fp32 Llama with every GPTQ weight dequantized by the torch reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    state = {}
    for key, val in tensors.items():
        if key.endswith(".qweight"):
            p = key[: -len(".qweight")]
            w = ref.dequantize(val, tensors[p + ".qzeros"], tensors[p + ".scales"], tensors[p + ".g_idx"])
            state[p + ".weight"] = w.t().contiguous()
        elif key.endswith((".weight",)):
            state[key] = val.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def _greedy(model, ids: list[list[int]], n: int) -> list[list[int]]:
    x = torch.tensor(ids)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
    return out[:, x.shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [1, 2])
def test_greedy_tokens_of_a_swapped_gptq_model_equal_the_reference(tmp_path: Path, kernel: int):
    """load_model(gptq_backend="triton_gemv") on CPU: GPTQModel's TORCH layers (v2 zero points) swapped for
    W4A16Linear (decode rows through the GEMV with split-K, the 9+-token prompts through the dequantize
    path), run in fp32 by HF ``generate``; tokens equal those of the dequantized reference weights, at batch 1
    and batch 3. (Through HF generate rather than the engine: the interpreter makes each layer call ~0.05 s.)"""
    from serving.model import load_model

    path, tensors = _make_checkpoint(tmp_path / "tiny-gptq-act-order")
    model, is_gptq = load_model(path, torch.device("cpu"), gptq_backend="triton_gemv")
    assert is_gptq
    swapped = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    assert len(swapped) == 7 * LAYERS and all(m.perm is not None for m in swapped)
    assert len({id(m.workspace) for m in swapped}) == 1
    model.float()
    for m in swapped:  # one program per call where it fits: the interpreter's cost is per program
        m.gemm_block_n = 256
        for b in (1, 4):
            m.configs[w4a16.config_key(m.out_features, m.in_features, b)] = GemvConfig(block_n=256, split_k=2,
                                                                                       kernel=kernel)
        m._picked.clear()
    reference = _reference_model(path, tensors)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, 300, (3, 10), generator=gen).tolist()
    assert _greedy(model, prompts[:1], 4) == _greedy(reference, prompts[:1], 4)
    assert _greedy(model, prompts, 3) == _greedy(reference, prompts, 3)
    assert swap_gptq_linears(model) == {"swapped": 0, "kept": 0}  # nothing left to swap


def test_swap_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    model = torch.nn.Sequential(W4A16Linear.from_tensors(**ref.random_gptq(256, 16, 64), group_size=64))
    with pytest.raises(KernelError, match="CUDA"):
        swap_gptq_linears(model)
    with pytest.raises(KernelError, match="CUDA"):
        model(torch.randn(1, 256))


# -- the swap's memory peak: each GPTQModel layer's tensors are released before the next layer is repacked

class _CyclicGPTQLinear(torch.nn.Module):
    """Standard GPTQ tensors held the way GPTQModel's TORCH layer holds them: the module keeps a bound method of
    itself (its ``torch.compile(self.dequantize_weight)``), a cycle only the garbage collector would break."""

    def __init__(self, k: int, n: int, seed: int):
        super().__init__()
        for key, val in ref.random_gptq(k, n, 64, sym=False, act_order=True, seed=seed).items():
            self.register_buffer(key, val.clone())
        self.register_buffer("bias", torch.randn(n).half())
        self.bits, self.group_size = 4, 64
        self.dequantize_weight = self.forward  # the cycle

    def qzero_format(self) -> int:
        return 1


def test_swap_frees_each_source_layer_before_repacking_the_next(monkeypatch):
    import gc

    model = torch.nn.Sequential(*[_CyclicGPTQLinear(256, 64 * (i + 1), seed=i) for i in range(4)])
    sources = [[getattr(m, key) for key in ("qweight", "qzeros", "scales", "g_idx", "bias")] for m in model]
    x = torch.randn(2, 256).half()
    want = [ref.gptq_linear(x, m.qweight, m.qzeros, m.scales, m.g_idx, m.bias) for m in model]

    def live_bytes() -> int:  # what the held references (the cycles) still pin
        return sum(t.untyped_storage().nbytes() for ts in sources for t in ts)

    total = live_bytes()
    layer = [sum(t.numel() * t.element_size() for t in ts) for ts in sources]
    seen: list[tuple[int, int]] = []
    real_repack = w4a16.repack

    def repack(*a, **kw):
        seen.append((len(seen), live_bytes()))
        return real_repack(*a, **kw)

    monkeypatch.setattr(w4a16, "repack", repack)
    gc.disable()  # the cycles stay uncollected, as they did in the GPU OOM
    try:
        assert swap_gptq_linears(model) == {"swapped": 4, "kept": 0}
    finally:
        gc.enable()
    # at the i-th repack, layers 0..i-1 are gone: the peak is the checkpoint, never checkpoint + copies
    assert seen == [(i, total - sum(layer[:i])) for i in range(4)]
    assert live_bytes() == 0
    for m, w in zip(model, want, strict=True):  # the replacements kept their own bias and still compute right
        _check(m(x), w, torch.float16)


def test_free_source_tensors_spares_shared_and_kept_storage():
    from serving.quant_linear import free_source_tensors

    m = _CyclicGPTQLinear(256, 16, seed=0)
    whole = torch.zeros(8, 64, dtype=torch.int32)
    m.qweight = whole[:4]  # a view into a bigger buffer: other tensors may live in it
    keep = torch.nn.Module()
    keep.register_buffer("b", m.bias)  # storage the replacement uses
    owned = sum(t.numel() * t.element_size() for t in (m.qzeros, m.scales, m.g_idx))
    freed = free_source_tensors(m, keep=keep)
    assert freed == owned
    assert whole.untyped_storage().nbytes() == 8 * 64 * 4 and keep.b.untyped_storage().nbytes() == 16 * 2
    assert m.qzeros is None and m.scales is None and m.g_idx is None


def test_gpu_bench_smoke_compares_both_kernels_and_writes_the_table(tmp_path: Path):
    """tests/gpu/bench_w4a16.py --smoke (tiny shapes, interpreter): kernel 1 from the shipped table and kernels 2
    and 3 from their grid are all timed for every (shape, rows), the written table holds the faster of each, and both
    tables' configs pass the device check against the reference."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OUT": str(tmp_path)}
    p = subprocess.run([sys.executable, "tests/gpu/bench_w4a16.py", "--smoke"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "w4a16.json").read_text())
    table = w4a16.load_config_table(tmp_path / "w4a16_configs.json")
    assert len(res["tuning"]) == 8 and set(table) == set(res["tuning"])
    for key, entry in res["tuning"].items():
        assert entry["v1"]["config"]["kernel"] == 1 and entry["v2"]["config"]["kernel"] in (2, 3), entry
        win = entry[entry["winner"]]
        assert win["us"] == min(entry["v1"]["us"], entry["v2"]["us"])
        assert table[key] == GemvConfig(**win["config"])
    assert {c["table"] for c in res["check"]} == {"v1", "v2"} and all(c["ok"] for c in res["check"])
