"""The W4A16 prefill GEMM (serving/kernels/w4a16_gemm.py) under Triton's interpreter (TRITON_INTERPRET=1, CPU)
against the dequantized torch reference: every group size, both zero-point kinds, act-order, K not a multiple
of 256, N not a multiple of the tile, and row counts across the M tiles (9 to 130)."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import reference as ref
from serving.kernels import w4a16, w4a16_gemm
from serving.kernels.w4a16 import KernelError

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


CASES = [  # K, N, group size, sym, act-order, rows, block_n
    (256, 64, 128, True, False, 9, 64),
    (200, 77, 32, False, False, 17, 32),
    (512, 40, 64, True, True, 33, 16),
    (600, 50, -1, False, False, 20, 64),
    (1280, 16, 256, False, True, 12, 16),
    (264, 96, 64, False, False, 130, 64),
]


@pytest.mark.parametrize("k, n, gs, sym, act, m, block_n", CASES)
def test_gemm_matches_dequantized_reference(k, n, gs, sym, act, m, block_n):
    t = ref.random_gptq(k, n, gs, sym, act, seed=k + n)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], gs)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    got = w4a16_gemm.matmul(x, packed, block_n=block_n)
    want = ref.gptq_linear(x, **t)
    assert got.shape == (m, n) and got.dtype == torch.float16
    # the weight is rounded to fp16 once ((q - z) * s) as in the dequantize path, then fp32 accumulation
    err = (got.float() - want).abs().max().item()
    assert err <= 2e-3 * want.abs().max().item() + 1e-6, err


def test_gemm_agrees_with_the_dequantize_path_and_reads_strided_rows():
    t = ref.random_gptq(512, 48, 128, False, True, seed=3)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 128)
    big = torch.randn(40, 1024, generator=torch.Generator().manual_seed(1)).half()
    x = big[:, :512]  # a view with row stride 1024, as a slice of a prefill chunk
    a = w4a16_gemm.matmul(x, packed)
    b = w4a16.matmul_dequant(x.float(), packed.__class__(packed.weight, packed.scale_zero, packed.perm,
                                                          packed.in_features, packed.out_features,
                                                          packed.group_size)).half()
    assert (a.float() - b.float()).abs().max().item() <= 2e-3 * b.float().abs().max().item()


def test_gemm_refuses_a_wrong_input_width():
    t = ref.random_gptq(256, 32, 128, True, False, seed=1)
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 128)
    with pytest.raises(KernelError, match="256 features"):
        w4a16_gemm.matmul(torch.zeros(10, 128).half(), packed)


COMPILE = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from serving.kernels._w4a16_gemm_triton import w4a16_gemm_kernel
sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "sz_ptr": "*fp16", "perm_ptr": "*i32", "out_ptr": "*fp16", "M": "i32",
       "N": "i32", "K": "i32", "K8": "i32", "chunks_per_group": "i32", "stride_xm": "i32", "stride_om": "i32"}
const = {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_J": 4, "HAS_PERM": False}
sig.update({k: "constexpr" for k in const})
aligned = [i for i, n in enumerate(sig) if n.endswith("_ptr") or n in ("N", "K", "K8")]
src = ASTSource(fn=triton.jit(w4a16_gemm_kernel), signature=sig, constexprs=const,
                attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
import re, subprocess, tempfile
from serving.kernels.sass import _tool
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"]); f.flush()
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
print(json.dumps({"registers": int(re.search(r"REG:(\\d+)", res).group(1)),
                  "spills": int(re.search(r"LOCAL:(\\d+)", res).group(1)), "mma": "mma" in k.asm["ptx"]}))
"""


def test_gemm_compiles_for_hopper_on_tensor_cores_without_spills():
    """A real sm_90 compile (Triton's wheel carries ptxas), in its own process without the interpreter: the
    tl.dot becomes tensor-core MMAs and nothing spills at the 64 x 64 tile the prefill chunks use."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", COMPILE], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats["mma"] and stats["spills"] == 0 and stats["registers"] <= 255, stats
