"""GPU benchmark: GPTQ a LLaMA-7B-shaped model with GPTQModel, measure its checkpoint, load it with several kernels.

Random fp16 weights at the real shape (hidden 4096, 32 layers, intermediate 11008, vocab 32000): honest for
time and bytes, never for quality. Prints and writes one JSON (``--out``/quantize_7b.json), rewritten after every
step so a run cut short still reports what it measured.

    python tests/gpu/bench_quantize_7b.py --out $OUT                       # the H100 run
    python tests/gpu/bench_quantize_7b.py --out /tmp/b --tiny --device cpu  # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
SHAPE_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_7b.json").write_text(json.dumps(results, indent=2, default=str))


def make_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer (any ids < vocab) so GPTQModel and transformers find one beside the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 500), special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 50, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def build_source(folder: Path, shape: dict, device: str) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(folder, shape["vocab_size"])
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return time.time() - t0


def random_gptq(folder: Path, shape: dict) -> None:
    """A GPTQ 4-bit g128 folder with random packed weights (skips quantizing when only loading is measured)."""
    from safetensors.torch import save_file

    h, inter, layers, vocab = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "vocab_size"))
    folder.mkdir(parents=True)
    t = {"model.embed_tokens.weight": (torch.randn(vocab, h) * 0.02).half(), "model.norm.weight": torch.ones(h).half(),
         "lm_head.weight": (torch.randn(vocab, h) * 0.02).half()}
    for i in range(layers):
        for name, (fi, fo) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                               "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
                               "mlp.down_proj": (inter, h)}.items():
            p = f"model.layers.{i}.{name}"
            t[p + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (fi // 8, fo), dtype=torch.int32)
            t[p + ".qzeros"] = torch.full((fi // 128, fo // 8), 0x77777777, dtype=torch.int32)
            t[p + ".scales"] = torch.full((fi // 128, fo), 0.004, dtype=torch.float16)
            t[p + ".g_idx"] = torch.arange(fi, dtype=torch.int32) // 128
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{n}.weight"] = torch.ones(h).half()
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    q = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq",
         "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16",
        "tie_word_embeddings": False, "quantization_config": q}))
    (folder / "quantize_config.json").write_text(json.dumps(q))
    make_tokenizer(folder, shape["vocab_size"])


def decode_speed(model, vocab: int, device: str, new_tokens: int) -> dict:
    ids = torch.randint(3, vocab, (1, 32), device=device, generator=torch.Generator(device).manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(input_ids=ids, max_new_tokens=2, **kw)  # warm-up (kernel JIT, autotune)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    return {"new_tokens": int(out.shape[1] - ids.shape[1]), "seconds": round(dt, 3),
            "tokens_per_s": round((out.shape[1] - ids.shape[1]) / dt, 2)}


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="Toy shape (script smoke test).")
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--backends", default="marlin,exllama_v2,torch")
    p.add_argument("--random-gptq", action="store_true", help="Skip quantizing: load a random packed checkpoint.")
    p.add_argument("--work", default=None, help="Scratch folder; default /dev/shm when it has 40 GB free, else /tmp.")
    a = p.parse_args()
    out, dev = Path(a.out), a.device
    shape = SHAPE_TINY if a.tiny else SHAPE_7B
    from gptqmodel import GPTQModel
    from gptqmodel import QuantizeConfig as GPTQModelConfig

    from training.quantize import estimate_memory, measure_checkpoint

    res: dict = {"shape": shape, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                 "torch": torch.__version__, "calibration": {"samples": a.samples, "tokens_each": a.seq}}
    try:
        import gptqmodel
        import transformers

        res["gptqmodel"], res["transformers"] = gptqmodel.__version__, transformers.__version__
    except AttributeError:
        pass
    if a.work is None:
        shm = Path("/dev/shm")
        a.work = str(shm) if shm.exists() and shutil.disk_usage(shm).free > 40e9 else tempfile.gettempdir()
    res["work"] = a.work
    if dev == "cuda":  # what the CUDA context alone takes, outside PyTorch's allocator
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        res["cuda_context_gib"] = gib(total - free)
    work = Path(tempfile.mkdtemp(dir=a.work, prefix="q7b-"))
    src, qdir = work / "src", work / "gptq"
    if a.random_gptq:
        random_gptq(qdir, shape)
        res["checkpoint"] = measure_checkpoint(qdir)
        return load_backends(res, a, qdir, shape, out)
    res["build_source_s"] = round(build_source(src, shape, dev), 1)
    save(res, out)

    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(3, min(shape["vocab_size"], 500), (a.seq,), generator=g).tolist(),
              "attention_mask": [1] * a.seq} for _ in range(a.samples)]
    qc = GPTQModelConfig(bits=4, group_size=128, desc_act=False, sym=True, damp_percent=0.05)
    t0 = time.time()
    model = GPTQModel.load(str(src), qc, device=dev, dtype=torch.float16)
    t1 = time.time()
    model.quantize(calib, batch_size=1)
    t2 = time.time()
    model.save(str(qdir))
    t3 = time.time()
    res["quantize"] = {"load_s": round(t1 - t0, 1), "quantize_s": round(t2 - t1, 1), "save_s": round(t3 - t2, 1),
                       "total_s": round(t3 - t0, 1)}
    del model
    gc.collect()
    torch.cuda.empty_cache() if dev == "cuda" else None
    config = json.loads((qdir / "config.json").read_text())
    res["checkpoint"] = measure_checkpoint(qdir)
    res["estimate"] = estimate_memory(config, 4, 128)
    res["estimate_embed_on_host"] = estimate_memory(config, 4, 128, embed_on_gpu=False)
    res["estimate_embed_on_host_lm_head4_kv8"] = estimate_memory(config, 4, 128, embed_on_gpu=False, lm_head_bits=4,
                                                                 kv_cache_bytes=1)
    save(res, out)
    return load_backends(res, a, qdir, shape, out)


def load_backends(res: dict, a: argparse.Namespace, qdir: Path, shape: dict, out: Path) -> int:
    from gptqmodel import GPTQModel

    from training.quantize import offload_embeddings

    dev = a.device
    res["backends"] = {}
    for b in a.backends.split(","):
        entry: dict = {}
        res["backends"][b] = entry
        try:
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            qm = GPTQModel.load(str(qdir), device=dev, backend=b)
            entry["load_s"] = round(time.time() - t0, 1)
            entry["kernels"] = sorted({type(m).__name__ for m in qm.model.modules() if hasattr(m, "qweight")})
            if dev == "cuda":
                free, total = torch.cuda.mem_get_info()
                entry["allocated_after_load_gib"] = gib(torch.cuda.memory_allocated())
                entry["device_used_after_load_gib"] = gib(total - free)
            entry["decode"] = decode_speed(qm.model, shape["vocab_size"], dev, a.new_tokens)
            if dev == "cuda":
                entry["peak_gib"] = gib(torch.cuda.max_memory_allocated())
            if b == a.backends.split(",")[0]:  # the cost of keeping the embedding table in host memory
                freed = offload_embeddings(qm.model)
                gc.collect()
                torch.cuda.empty_cache() if dev == "cuda" else None
                entry["embed_on_host"] = {"freed_gib": gib(freed), **decode_speed(qm.model, shape["vocab_size"], dev,
                                                                                  a.new_tokens)}
                if dev == "cuda":
                    entry["embed_on_host"]["allocated_gib"] = gib(torch.cuda.memory_allocated())
            del qm
        except Exception as e:  # noqa: BLE001 - one kernel failing to load is a result, not the end of the run
            entry["error"] = f"{type(e).__name__}: {e}"[:800]
            entry["traceback"] = traceback.format_exc()[-1500:]
        gc.collect()
        torch.cuda.empty_cache() if dev == "cuda" else None
        save(res, out)
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
