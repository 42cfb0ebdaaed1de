"""GPTQ on CUDA: the stage CLI quantizes a tiny Llama on the GPU and the checkpoint loads with each CUDA kernel.

The LLaMA-7B-shaped timing and sizes are a benchmark, not a test: ``tests/gpu/bench_quantize_7b.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, run_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpu"))
from test_quantize import write_config  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["marlin", "exllama_v2", "torch"])
def test_cuda_quantize_and_load_with_kernel(backend, tmp_path):
    from gptqmodel import GPTQModel

    # Marlin needs in/out features that are multiples of 64/128: a 256-wide toy model.
    model = make_tiny_llama(tmp_path / "src", hidden=256, layers=2)
    out = tmp_path / "out"
    config = write_config(tmp_path, model, out, gptq={"device": "cuda", "group_size": 128},
                          report={"backend": backend})
    run_stage("training.quantize", config, env={"HF_HUB_OFFLINE": "1"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["perplexity"]["gptq"] > 1
    qm = GPTQModel.load(str(out / "model"), device="cuda", backend=backend)
    kernels = {type(m).__name__ for m in qm.model.modules() if hasattr(m, "qweight")}
    assert kernels and all(backend.split("_")[0] in k.lower() for k in kernels), kernels
    ids = torch.tensor([[5, 17, 42, 99]], device="cuda")
    assert qm.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
