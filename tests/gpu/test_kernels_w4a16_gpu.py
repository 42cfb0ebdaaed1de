"""The W4A16 kernels compiled for the GPU (the CPU tests run them under Triton's interpreter): every variant
against the dequantized torch reference, split-K inside a replayed CUDA graph, and the engine on a tiny
act-order GPTQ checkpoint with ``gptq_backend: triton_gemv``.

    python -m pytest -q tests/gpu/test_kernels_w4a16_gpu.py
Speed is a benchmark, not a test: tests/gpu/bench_w4a16.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from serving.kernels import reference as ref
from serving.kernels import w4a16
from serving.kernels.w4a16 import GemvConfig, SplitKWorkspace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [  # K, N, group size, sym, act-order, rows, config
    (4096, 4096, 128, True, False, 1, None),
    (4096, 1000, 128, False, True, 2, None),
    (11008, 4096, 128, True, False, 4, None),
    (4096, 12288, 64, False, False, 8, None),
    (4096, 4096, 128, True, False, 1, GemvConfig(block_n=128, split_k=4, num_warps=8, prefetch=True)),
    (4096, 4096, 32, False, True, 1, GemvConfig(block_n=32, split_k=8, scale_w=True)),
    (1288, 520, 128, False, True, 3, GemvConfig(block_n=16, split_k=2)),
    (4096, 2048, -1, False, False, 8, GemvConfig(block_n=64, split_k=4, dot=True, num_warps=8)),
    (4096, 2048, 256, True, False, 2, GemvConfig(block_n=32, split_k=2, scale_w=True, prefetch=True)),
    # kernel 2: CUDA-core loop (1, 2 rows) and tl.dot loop (wgmma at 4 warps, 1..8 rows), unrolled or not
    (4096, 12288, 128, True, False, 1, GemvConfig(block_n=32, split_k=2, num_warps=2, kernel=2)),
    (4096, 4096, 32, False, True, 1, GemvConfig(block_n=64, split_k=8, num_warps=4, kernel=2, unroll=2)),
    (11008, 4096, 128, False, True, 2, GemvConfig(block_n=32, split_k=4, num_warps=2, kernel=2, unroll=2)),
    (4096, 22016, 128, True, False, 1, GemvConfig(block_n=128, split_k=1, num_warps=4, kernel=2, dot=True)),
    (4096, 4096, 64, False, True, 4, GemvConfig(block_n=128, split_k=4, num_warps=4, kernel=2, dot=True, unroll=2)),
    # kernel 3: fp16 nibble pairs, wgmma with the weights in registers
    (4096, 12288, 128, True, False, 1, GemvConfig(block_n=128, split_k=2, num_warps=4, kernel=3, dot=True)),
    (4096, 4096, 32, False, True, 3, GemvConfig(block_n=64, split_k=8, num_warps=4, kernel=3, dot=True)),
    (11008, 4096, 128, False, True, 8, GemvConfig(block_n=256, split_k=4, num_warps=8, kernel=3, dot=True)),
    (4096, 2048, -1, False, False, 2, GemvConfig(block_n=128, split_k=1, num_warps=8, kernel=3, dot=True)),
    (11008, 4096, 128, True, False, 8, GemvConfig(block_n=256, split_k=8, num_warps=8, kernel=2, dot=True)),
    # kernel 3 at one row through packed fp16 FMAs (scale after each chunk at g128, per nibble at g32)
    (4096, 12288, 128, True, False, 1, GemvConfig(block_n=32, split_k=2, num_warps=2, kernel=3)),
    (11008, 4096, 128, False, True, 1, GemvConfig(block_n=64, split_k=4, num_warps=4, kernel=3)),
    (4096, 4096, 32, False, True, 1, GemvConfig(block_n=128, split_k=8, num_warps=8, kernel=3)),
    (1288, 520, 128, False, True, 3, GemvConfig(block_n=64, split_k=2, num_warps=2, kernel=2, dot=True)),
]


@pytest.mark.parametrize("k, n, gs, sym, act, m, cfg", CASES)
def test_gemv_on_cuda_matches_dequantized_reference(k, n, gs, sym, act, m, cfg):
    t = ref.random_gptq(k, n, gs, sym, act, seed=k + n + m, device="cuda")
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], gs)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    want = ref.gptq_linear(x, **t)
    ws = SplitKWorkspace("cuda", n)
    got = w4a16.gemv(x, packed, cfg or w4a16.default_config(n, k, m), ws).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 3e-3
    assert ws.counters.abs().sum().item() == 0
    big = torch.randn(37, k, device="cuda", dtype=torch.float16)
    ref_big = ref.gptq_linear(big, **t)
    assert ((w4a16.matmul_dequant(big, packed).float() - ref_big).abs().max() / ref_big.abs().max()).item() < 3e-3


@pytest.mark.parametrize("cfg", [GemvConfig(block_n=32, split_k=8),
                                 GemvConfig(block_n=128, split_k=8, num_warps=4, kernel=2, dot=True, unroll=2)])
def test_split_k_in_a_replayed_cuda_graph(cfg):
    """The counters reset by the last slice make every replay start clean: new inputs, right answers."""
    k, n = 4096, 4096
    t = ref.random_gptq(k, n, 128, False, True, seed=3, device="cuda")
    packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 128)
    ws = SplitKWorkspace("cuda", n)
    x = torch.randn(2, k, device="cuda", dtype=torch.float16)
    out = torch.empty(2, n, device="cuda", dtype=torch.float16)
    w4a16.gemv(x, packed, cfg, ws, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w4a16.gemv(x, packed, cfg, ws, out=out)
    for seed in range(5):
        x.copy_(torch.randn(2, k, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(
            seed)))
        g.replay()
        want = ref.gptq_linear(x, **t)
        assert ((out.float() - want).abs().max() / want.abs().max()).item() < 3e-3


def test_engine_decodes_with_triton_gemv(tmp_path: Path):
    """The engine (CUDA graphs, fp16) on a tiny act-order asymmetric checkpoint: every GPTQ layer swapped, and
    the first greedy tokens equal those of the fp32 model with the dequantized reference weights (fp16 against
    fp32 may part on a near-tie later on random weights)."""
    pytest.importorskip("gptqmodel")  # travels as a wheel to the GPU machine (tests/gpu/wheels.sh)
    from cpu.test_kernels_w4a16 import _greedy, _make_checkpoint, _reference_model

    from serving.engine import EngineOptions, LLMEngine, SamplingParams
    from serving.quant_linear import W4A16Linear

    path, tensors = _make_checkpoint(tmp_path / "tiny-gptq-act-order")
    eng = LLMEngine(path, EngineOptions(device="cuda", gpu_memory_gb=None, max_model_len=128, max_num_seqs=4,
                                        gptq_backend="triton_gemv"))
    eng.load_and_start()
    try:
        assert sum(isinstance(m, W4A16Linear) for m in eng._model.modules()) == 14
        prompts = torch.randint(5, 300, (3, 10), generator=torch.Generator().manual_seed(1)).tolist()

        async def one(ids: list[int]) -> list[int]:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            return [t for o in [o async for o in eng.generate(ids, params)] for t in o.token_ids]

        async def run() -> list[list[int]]:
            return await asyncio.gather(*(one(p) for p in prompts))

        got = asyncio.run(run())
    finally:
        eng.shutdown()
    want = _greedy(_reference_model(path, tensors), prompts, 6)
    assert [g[:3] for g in got] == [w[:3] for w in want], (got, want)
