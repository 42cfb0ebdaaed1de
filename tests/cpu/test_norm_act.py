"""serving.kernels.norm_act: the residual add + RMSNorm and the SiLU gate kernels (Triton's interpreter on CPU)
against the torch expressions they replace, on rows with a stride of their own (views of a fused projection's
output, as the runner passes them), and the arguments they refuse."""

from __future__ import annotations

import pytest
import torch

from serving.kernels.norm_act import add_rms_norm, add_rms_norm_ref, silu_mul, silu_mul_ref


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    pytest.importorskip("numpy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, hidden", [(1, 64), (5, 576), (3, 1000)])
@pytest.mark.parametrize("with_d", [False, True])
def test_add_rms_norm_matches_torch(dtype, rows, hidden, with_d):
    g = torch.Generator().manual_seed(rows * hidden)
    wide = torch.randn(rows, hidden + 7, generator=g).to(dtype)
    h = wide[:, 3:3 + hidden]  # a row stride of its own
    d = torch.randn(rows, hidden, generator=g).to(dtype) if with_d else None
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    h_ref, x_ref = add_rms_norm_ref(h, d, w, 1e-5)
    h_got, x_got = add_rms_norm(h, d, w, 1e-5, backend="triton")
    assert torch.equal(h_got, h_ref)  # the add rounds once, as torch's
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(x_got, x_ref, **tol)
    assert x_got.dtype == x_ref.dtype and x_got.shape == x_ref.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_matches_torch_on_the_halves_of_a_fused_output(dtype):
    g0 = torch.Generator().manual_seed(0)
    gu = (3 * torch.randn(4, 2 * 1500, generator=g0)).to(dtype)
    g, u = gu.chunk(2, dim=-1)
    got = silu_mul(g, u, backend="triton")
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got, silu_mul_ref(g, u), **tol)


def test_cpu_auto_is_torch_and_bad_arguments_are_named():
    h = torch.randn(2, 16)
    assert torch.equal(add_rms_norm(h, None, torch.ones(16), 1e-6)[1], add_rms_norm_ref(h, None, torch.ones(16),
                                                                                          1e-6)[1])
    with pytest.raises(ValueError, match="w must be"):
        add_rms_norm(h, None, torch.ones(8), 1e-6, backend="triton")
    with pytest.raises(ValueError, match="d must be"):
        add_rms_norm(h, torch.randn(3, 16), torch.ones(16), 1e-6, backend="triton")
    with pytest.raises(ValueError, match="2-D"):
        silu_mul(torch.randn(2, 1, 8), torch.randn(2, 1, 8), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        silu_mul(h, h, backend="cuda")


AOT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from serving.kernels import _norm_act_triton as m

def build(fn, types, constexprs):
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("ptr")}
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4))
    return len(k.asm["cubin"]) > 0
fp = {n: "*fp16" for n in ("h_ptr", "d_ptr", "w_ptr", "hout_ptr", "x_ptr", "g_ptr", "u_ptr", "out_ptr")}
print(build(m._add_rms_kernel, {**fp, "eps": "fp32"}, dict(HAS_D=True, BLOCK=4096)),
      build(m._silu_mul_kernel, fp, dict(BLOCK=1024)))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT], cwd=root, env={**env, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True"], done.stdout
