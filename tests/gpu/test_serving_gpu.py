"""Engine on CUDA: CUDA-graph decode agrees with eager decode, the Triton pieces decode as the torch ones and HF
``generate``, and the memory budget holds.

The 7B measurements are a benchmark command, not a test:
    python -m serving.bench --model /tmp/l7 --lm-head-int8 --batch-sizes 1,2,4,8 --out bench.json
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from serving.engine import EngineOptions, LLMEngine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["Hello, how are", "The capital of France", "Two plus two", "Write a poem", "PPO improves"]


def _run(eng: LLMEngine, max_tokens: int = 12) -> list[list[int]]:
    async def one(p: str) -> list[int]:
        ids = eng.tokenizer(p)["input_ids"]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [t for o in [o async for o in eng.generate(ids, params)] for t in o.token_ids]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    return asyncio.run(run())


def test_cuda_graph_decode_matches_eager(tiny_model: Path):
    outs = {}
    for graphs in (False, True):
        eng = LLMEngine(tiny_model, EngineOptions(device="cuda", dtype="float32", gpu_memory_gb=None,
                                                  max_model_len=128, max_num_seqs=4, cuda_graphs=graphs))
        eng.load_and_start()
        try:
            assert eng.info["cuda_graphs"] is graphs
            outs[graphs] = _run(eng)
        finally:
            eng.shutdown()
    assert outs[True] == outs[False]


def test_engine_with_the_kernels_decodes_as_the_torch_pieces_and_generate(tiny_model: Path):
    """fp32 on CUDA: the engine with the Triton pieces (the CUDA default) gives the greedy tokens of the engine
    with every piece in torch (``attention_kernel: torch``) and of HF ``generate``, prefill and decode alike."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outs = {}
    for kernel in ("auto", "torch"):
        eng = LLMEngine(tiny_model, EngineOptions(device="cuda", dtype="float32", gpu_memory_gb=None,
                                                  max_model_len=128, max_num_seqs=4, attention_kernel=kernel))
        eng.load_and_start()
        try:
            assert eng.runner.rope_kernel is (kernel == "auto")
            outs[kernel] = _run(eng)
        finally:
            eng.shutdown()
    assert outs["auto"] == outs["torch"]
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).cuda().eval()
    for p, got in zip(PROMPTS, outs["auto"], strict=True):
        ids = torch.tensor([tok(p)["input_ids"]], device="cuda")
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1]:].tolist()
        assert got == ref, p


def test_int8_lm_head_takes_the_w8a16_kernel_on_cuda(tiny_model: Path):
    """The int8 lm_head on CUDA reads its rows through the Triton W8A16 kernel whatever engine.vendor_blas says
    (the dequantize + cuBLAS path was 32 copies and 32 GEMMs a 7B decode step); its logits equal that path's."""
    eng = LLMEngine(tiny_model, EngineOptions(device="cuda", dtype="float16", gpu_memory_gb=None,
                                              max_model_len=128, max_num_seqs=2, lm_head_int8=True))
    eng.load_and_start()
    try:
        head = eng.runner.lm_head
        assert head.use_kernel
        x = torch.randn(3, head.weight.shape[1], device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            got = head(x)
            head.use_kernel = False
            want = head(x)
            head.use_kernel = True
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        assert len(_run(eng)) == len(PROMPTS)
    finally:
        eng.shutdown()


def test_budget_caps_allocations(tiny_model: Path):
    torch.cuda.reset_peak_memory_stats()
    # the budget is the whole process as nvidia-smi counts it (CUDA context included: 612 MiB bare on the H200)
    eng = LLMEngine(tiny_model, EngineOptions(device="cuda", gpu_memory_gb=1.5, max_model_len=256, max_num_seqs=64,
                                              kv_cache_dtype="int8"))
    eng.load_and_start()
    try:
        _run(eng, 32)
        assert torch.cuda.max_memory_allocated() <= 1.5 * 1024**3
        assert eng.info["kv_cache_tokens"] >= 4 * 256
        report = eng.memory_report()
        if report["process_nvml"] is not None:
            assert report["process_nvml"] <= 1.5 * 1024 and report["outside_allocator"] > 0
    finally:
        eng.shutdown()


def test_marlin_projections_fuse(tmp_path: Path):
    """engine.fuse_projections on GPTQModel's Marlin layers: q/k/v and gate/up fuse in every layer (the load-time
    check against the separate layers passed) and greedy decoding gives the tokens of the unfused engine."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "cpu"))
    from test_serving_engine import make_tiny_gptq

    model = make_tiny_gptq(tmp_path / "gptq")
    outs = {}
    for fuse in (False, True):
        eng = LLMEngine(model, EngineOptions(device="cuda", gpu_memory_gb=None, max_model_len=128, max_num_seqs=4,
                                             gptq_backend="marlin", fuse_projections=fuse))
        eng.load_and_start()
        try:
            layers = len(eng.runner.layers)
            assert eng.info["fused_projections"] == ({"qkv": layers, "gate_up": layers} if fuse else
                                                     {"qkv": 0, "gate_up": 0})
            outs[fuse] = _run(eng)
        finally:
            eng.shutdown()
    assert outs[True] == outs[False]
