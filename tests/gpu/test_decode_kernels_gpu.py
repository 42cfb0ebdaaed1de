"""The decode/prefill Triton kernels the runner takes on CUDA (``rope_write_kv``, ``serving.kernels.norm_act``)
against their torch references on the GPU (the engine's greedy tokens with them: tests/gpu/test_serving_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_rope_write_kv_on_cuda_matches_torch(dtype, int8):
    from serving.kernels.paged_attention import rope_write_kv

    g = torch.Generator(device="cuda").manual_seed(0)
    n, heads, kvh, hd, bs = 6, 32, 8, 128, 16
    qkv = torch.randn(n, (heads + 2 * kvh) * hd, device="cuda", generator=g).to(dtype)
    q, k, v = qkv.split([heads * hd, kvh * hd, kvh * hd], dim=1)
    pos = torch.randint(0, 4000, (n,), device="cuda", generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.randperm(8 * bs, device="cuda", generator=g)[:n]
    outs = []
    for backend in ("torch", "triton"):
        kc = torch.zeros(8, kvh, bs, hd, dtype=torch.int8 if int8 else dtype, device="cuda")
        sc = [torch.zeros(8, kvh, bs, 1, dtype=dtype, device="cuda") for _ in range(2)] if int8 else [None, None]
        vc = torch.zeros_like(kc)
        outs.append((rope_write_kv(q, k, v, cos, sin, kc, vc, *sc, slots, backend=backend), kc, vc))
    (q0, k0, v0), (q1, k1, v1) = outs
    torch.testing.assert_close(q1.float(), q0.float(), atol=2e-2, rtol=2e-2)
    # int8: one step apart in fp16; in bf16 (8-bit mantissa) the torch piece rounds the rotated k and the scale
    # to bf16 before quantizing (each up to half a step at the top of the range), the kernel rounds once: 2 steps
    # (measured on the H200: 2)
    steps = 1 if dtype == torch.float16 else 2
    assert (k1.float() - k0.float()).abs().max() <= (steps if int8 else 0.05)
    assert torch.equal(v1, v0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_act_on_cuda_matches_torch(dtype):
    from serving.kernels.norm_act import add_rms_norm, add_rms_norm_ref, silu_mul, silu_mul_ref

    h = torch.randn(7, 4096, device="cuda").to(dtype)
    d = torch.randn(7, 4096, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    (h0, x0), (h1, x1) = add_rms_norm_ref(h, d, w, 1e-5), add_rms_norm(h, d, w, 1e-5, backend="triton")
    assert torch.equal(h1, h0)
    torch.testing.assert_close(x1.float(), x0.float(), atol=2e-2, rtol=2e-2)
    gu = torch.randn(7, 2 * 11008, device="cuda").to(dtype)
    g, u = gu.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(g, u, backend="triton").float(), silu_mul_ref(g, u).float(), atol=2e-2,
                               rtol=2e-2)
