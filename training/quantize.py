"""Stage 4: the aligned model as a 4-bit GPTQ checkpoint (GPTQModel), with a quality report and a memory plan.

Quantize (reads ``model.path``: a model folder, a .gguf, or a stage folder (PPO/DPO/GRPO/SFT) holding manifest.json):
    python -m training.quantize --config training/configs/quantize.yaml [gptq.bits=8 calibration.num_samples=64 ...]
Quality report of a finished run (perplexity of source, GPTQ and round-to-nearest; greedy generations):
    python -m training.quantize report --config training/configs/quantize.yaml
Memory: estimate from a model's config.json and, for a checkpoint folder, the bytes its tensors really take:
    python -m training.quantize memory PATH [--bits 4] [--group-size 128] [--budget-gib 4] [--embed-on-host]

Writes ``output_dir/model`` (a standard GPTQ folder: safetensors with qweight/qzeros/scales/g_idx,
quantize_config.json, config.json with quantization_config, tokenizer and chat template),
``output_dir/quality.json`` and, last, ``manifest.json``. The model folder is assembled under a
``.tmp-`` name and renamed into place, so a killed Job never leaves a half checkpoint a server could load.
GPTQ is one pass, so ``--resume`` (accepted like every stage) starts it over; a completed folder is only
replaced once the new checkpoint is whole. Set ``GPTQMODEL_CPU_WORKERS=2`` on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import runner
from training.config import (  # noqa: F401 - the quantize configs are re-exported here, where they are used
    DEFAULT_PROMPTS,
    CalibrationConfig,
    ConfigError,
    GPTQOptions,
    QuantizeConfig,
    ReportConfig,
    TextSource,
)

log = logging.getLogger("training.quantize")

GIB = 1024**3
DEFAULT_BUDGET_GIB = 4.0
DEFAULT_RESERVE_GIB = 0.75  # CUDA context, kernel workspaces, allocator slack (H100: ~0.9 GiB incl. cache)


# ----------------------------------------------------------------------------- pre-flight


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("gptq.device: cuda requested but no CUDA device is visible")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def _cpu_has_bf16() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if _cpu_has_bf16() else torch.float32
    return getattr(torch, choice)


def _save_dtype(opts: GPTQOptions, compute: torch.dtype, source_config: dict[str, Any]) -> torch.dtype:
    if opts.save_dtype != "auto":
        return getattr(torch, opts.save_dtype)
    if compute != torch.float32:
        return compute
    src = str(source_config.get("dtype") or source_config.get("torch_dtype") or "")
    return torch.bfloat16 if src.endswith("bfloat16") else torch.float16


def cast_unquantized_(folder: Path, dtype: torch.dtype) -> int:
    """Rewrite the checkpoint's floating tensors other than GPTQ ``scales`` in ``dtype`` (and ``config.json``'s
    dtype); returns how many changed. Runs on the temp folder before it is renamed into place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        todo = [k for k, v in state.items() if v.is_floating_point() and v.dtype != dtype
                and not k.endswith(".scales")]
        if todo:
            for k in todo:
                state[k] = state[k].to(dtype)
            save_file(state, str(f), metadata=meta)
            changed += len(todo)
    cfg_file = folder / "config.json"
    if changed and cfg_file.exists():
        config = json.loads(cfg_file.read_text())
        name = str(dtype).removeprefix("torch.")
        config.update({k: name for k in ("dtype", "torch_dtype") if k in config} or {"dtype": name})
        cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    return changed


def check_model(cfg: QuantizeConfig) -> tuple[str, str | None, Any]:
    """(folder, gguf file, transformers config); a clear error if GPTQModel cannot quantize it."""
    from transformers import AutoConfig

    from training.models import _locate

    folder, gguf = _locate(cfg.model)
    try:
        hf = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"model.path: {cfg.model.path}: unknown architecture ({e})") from e
    if getattr(hf, "quantization_config", None):
        raise ConfigError(f"model.path: {cfg.model.path} is already quantized ({hf.quantization_config!r:.80}); "
                          "give the full-precision model")
    from gptqmodel.models.auto import MODEL_MAP

    if hf.model_type not in MODEL_MAP:
        raise ConfigError(f"model.path: {cfg.model.path}: architecture {hf.model_type!r} has no GPTQ support in "
                          f"GPTQModel (supported include {', '.join(sorted(MODEL_MAP)[:12])}, ...)")
    return folder, gguf, hf


# ----------------------------------------------------------------------------- texts


def read_texts(src: TextSource, tokenizer: Any) -> list[str]:
    """Every text of ``src`` (chat rows rendered with the tokenizer's chat template)."""
    from training.data import DataError, load_rows, read_rows

    if src.format == "chat":
        convs, _ = load_rows(src.data, "sft", on_error="skip")
        return [tokenizer.apply_chat_template(c.messages, tokenize=False) for c in convs]
    texts: list[str] = []
    for source in src.data:
        if source.endswith(".txt"):
            try:
                body = Path(source).read_text(encoding="utf-8")
            except OSError as e:
                raise DataError(f"cannot read: {e}", source=source) from e
            texts += [p.strip() for p in body.split("\n\n") if p.strip()]
            continue
        for n, row in read_rows(source):
            if not isinstance(row.get("text"), str):
                raise DataError("expected a string", source=source, line=n, field="text")
            texts.append(row["text"])
    return texts


def sample_token_ids(texts: list[str], src: TextSource, tokenizer: Any, seed: int,
                     exclude: set[str] = frozenset()) -> tuple[list[list[int]], list[str]]:
    """Up to ``num_samples`` token lists of at least ``min_length`` tokens (seeded order), and their texts."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    ids, used = [], []
    for i in order:
        if texts[i] in exclude:
            continue
        tokens = tokenizer(texts[i], add_special_tokens=False)["input_ids"][: src.max_length]
        if len(tokens) >= src.min_length:
            ids.append(tokens)
            used.append(texts[i])
            if len(ids) == src.num_samples:
                break
    return ids, used


def calibration_set(cfg: QuantizeConfig, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    cal = cfg.calibration
    ids, used = sample_token_ids(read_texts(cal, tokenizer), cal, tokenizer, cfg.seed)
    if len(ids) < cal.min_samples:
        raise ConfigError(f"calibration.data: only {len(ids)} samples of >= {cal.min_length} tokens in {cal.data} "
                          f"(calibration.min_samples={cal.min_samples}); add text or lower calibration.min_length")
    return ids, used


def eval_set(cfg: QuantizeConfig, tokenizer: Any, calibration_texts: list[str]) -> list[list[int]]:
    src = cfg.report.eval or cfg.calibration.model_copy(update={"num_samples": 32, "max_length": 256})
    ids, _ = sample_token_ids(read_texts(src, tokenizer), src, tokenizer, cfg.seed + 1, exclude=set(calibration_texts))
    if not ids:
        raise ConfigError(f"report.eval.data: no held-out sample of >= {src.min_length} tokens (calibration texts are "
                          "excluded); give report.eval.data")
    return ids


# ----------------------------------------------------------------------------- RTN and evaluation


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on GPTQ's grid (min/max per group of input channels), returned dequantized."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    groups = math.ceil(in_f / g)
    # a ragged last group is padded with zeros, which never widen the (0-including) min/max range
    x = F.pad(w.detach().float(), (0, groups * g - in_f)).reshape(out_f, groups, g)
    maxq = 2**bits - 1
    xmin, xmax = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(out_f, groups * g)[:, :in_f].to(w.dtype)


@torch.no_grad()
def rtn_quantize_(model: nn.Module, bits: int, group_size: int, sym: bool, lm_head: bool = False) -> int:
    """Replace the weights GPTQ would quantize (every Linear but lm_head) by their RTN values; returns the count."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (lm_head or not name.endswith("lm_head")):
            mod.weight.copy_(fake_quantize(mod.weight, bits, group_size, sym))
            n += 1
    return n


@torch.no_grad()
def perplexity(model: nn.Module, samples: list[list[int]], device: torch.device) -> float:
    """exp(mean next-token NLL) over all samples, one sequence at a time (no padding to get wrong)."""
    nll, count = 0.0, 0
    for ids in samples:
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
           device: torch.device) -> list[str]:
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def load_gptq(folder: str | Path, device: torch.device, backend: str = "auto") -> nn.Module:
    """A GPTQ checkpoint through GPTQModel with the named kernel (auto, marlin, exllama_v2, torch, ...)."""
    from gptqmodel import GPTQModel

    if backend == "auto" and device.type == "cpu":
        cfg = json.loads((Path(folder) / "config.json").read_text())
        g = cfg.get("quantization_config", {}).get("group_size", -1)
        try:
            dims = [i for _, i, _ in linear_shapes(cfg)]
        except KeyError:  # not LLaMA-shaped: let GPTQModel choose
            dims = []
        if g != -1 and any(d % g for d in dims):
            backend = "torch"  # the CPU int4pack kernel auto picks needs whole groups (e.g. SmolLM2's 576 % 128)
    return GPTQModel.load(str(folder), device=str(device), backend=backend)


def quality_report(cfg: QuantizeConfig, source: str, gguf: str | None, quantized: Path, tokenizer: Any,
                   samples: list[list[int]], device: torch.device) -> dict[str, Any]:
    """Perplexity and greedy answers of the source (fp32), the GPTQ checkpoint and RTN at the same settings."""
    from training.models import load_policy

    rep = cfg.report
    src_cfg = cfg.model.model_copy(update={"path": source, "gguf_file": gguf, "lora": cfg.model.lora.model_copy(
        update={"rank": 0})})
    result: dict[str, Any] = {"eval_samples": len(samples), "eval_tokens": sum(len(s) for s in samples),
                              "bits": cfg.gptq.bits, "group_size": cfg.gptq.group_size, "prompts": rep.prompts}
    ppl: dict[str, float] = {}
    gens: dict[str, list[str]] = {}
    t0 = time.time()
    model = load_policy(src_cfg, trainable=False).to(device).eval()
    ppl["source"] = perplexity(model, samples, device)
    gens["source"] = greedy(model, tokenizer, rep.prompts, rep.max_new_tokens, device)
    if rep.rtn:
        rtn_quantize_(model, cfg.gptq.bits, cfg.gptq.group_size, cfg.gptq.sym, cfg.gptq.lm_head)
        ppl["rtn"] = perplexity(model, samples, device)
        gens["rtn"] = greedy(model, tokenizer, rep.prompts, rep.max_new_tokens, device)
    del model
    qmodel = load_gptq(quantized, device, rep.backend)
    result["gptq_kernel"] = sorted({type(m).__name__ for m in qmodel.model.modules() if hasattr(m, "qweight")})
    ppl["gptq"] = perplexity(qmodel.model, samples, device)
    gens["gptq"] = greedy(qmodel.model, tokenizer, rep.prompts, rep.max_new_tokens, device)
    del qmodel
    result.update(perplexity=ppl, generations=gens, eval_seconds=round(time.time() - t0, 1))
    result["gptq_vs_source"] = ppl["gptq"] / ppl["source"] - 1
    if "rtn" in ppl:
        result["gptq_better_than_rtn"] = ppl["gptq"] < ppl["rtn"]
    if rep.max_ppl_increase is not None:
        result["passed"] = result["gptq_vs_source"] <= rep.max_ppl_increase
    return result


# ----------------------------------------------------------------------------- memory


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def linear_shapes(config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of one decoder layer's linears, LLaMA-style (Llama, Mistral, Qwen2...)."""
    c = _text_config(config)
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    inter = c["intermediate_size"]
    return [("q_proj", h, heads * hd), ("k_proj", h, kv * hd), ("v_proj", h, kv * hd), ("o_proj", heads * hd, h),
            ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]


def gptq_linear_bytes(in_f: int, out_f: int, bits: int, group_size: int) -> dict[str, int]:
    """Bytes of one GPTQ-format linear: packed int32 qweight/qzeros, fp16 scales, int32 g_idx."""
    groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    return {"qweight": math.ceil(in_f * bits / 32) * out_f * 4, "qzeros": groups * math.ceil(out_f * bits / 32) * 4,
            "scales": groups * out_f * 2, "g_idx": in_f * 4}


def estimate_memory(config: dict[str, Any], bits: int = 4, group_size: int = 128, *, lm_head_bits: int | None = None,
                    embed_on_gpu: bool = True, kv_cache_bytes: int = 2, budget_gib: float = DEFAULT_BUDGET_GIB,
                    reserve_gib: float = DEFAULT_RESERVE_GIB, prefill_tokens: int = 512) -> dict[str, Any]:
    """GPU bytes of a GPTQ LLaMA-style model from its ``config.json`` dict, and the KV cache left in a budget.

    ``lm_head_bits``: None keeps lm_head in fp16. ``embed_on_gpu=False``: the embedding table stays in host
    memory (looked up on CPU, only the hidden states move). ``kv_cache_bytes``: 2 = fp16 KV, 1 = 8-bit.
    ``reserve_gib``: CUDA context and workspaces. Activations: one ``prefill_tokens`` chunk with last-token
    logits only (fp16 hidden/MLP intermediates, fp32 logits). ``kv_tokens``: tokens (over all sequences) whose
    keys and values fit in what is left.
    """
    c = _text_config(config)
    layers, h, vocab = c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    parts = {"qweight": 0, "qzeros": 0, "scales": 0, "g_idx": 0}
    for _, i, o in linear_shapes(config):
        for k, v in gptq_linear_bytes(i, o, bits, group_size).items():
            parts[k] += v * layers
    quantized = sum(parts.values())
    tied = bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    embed = vocab * h * 2
    if lm_head_bits is None:
        lm_head = 0 if tied and embed_on_gpu else vocab * h * 2
    else:
        lm_head = sum(gptq_linear_bytes(h, vocab, lm_head_bits, group_size).values())
    norms = (2 * layers + 1) * h * 2
    gpu_embed = embed if embed_on_gpu else 0
    weights = quantized + gpu_embed + lm_head + norms
    kv_per_token = 2 * layers * kv_heads * hd * kv_cache_bytes
    activations = prefill_tokens * (4 * h + 3 * c["intermediate_size"]) * 2 + vocab * 4
    budget, reserve = int(budget_gib * GIB), int(reserve_gib * GIB)
    free = budget - reserve - weights - activations
    return {
        "bits": bits, "group_size": group_size, "lm_head_bits": lm_head_bits, "embed_on_gpu": embed_on_gpu,
        "parts": {"quantized_linears": quantized, **{f"quantized_{k}": v for k, v in parts.items()},
                  "embed_tokens": embed, "embed_tokens_on_gpu": gpu_embed, "lm_head": lm_head, "norms": norms},
        "weights_gpu_bytes": weights, "weights_gpu_gib": weights / GIB,
        "fp16_weights_bytes": (sum(i * o for _, i, o in linear_shapes(config)) * layers + embed // 2
                               + (0 if tied else vocab * h)) * 2 + norms,
        "kv_cache_bytes_per_token": kv_per_token, "activation_bytes": activations,
        "budget_bytes": budget, "reserve_bytes": reserve, "kv_budget_bytes": max(free, 0),
        "kv_tokens": max(free, 0) // kv_per_token,
        "fits": free > 0,
    }


class HostEmbedding(nn.Module):
    """An embedding table kept in host memory: ids go to the CPU, only the looked-up rows go to the GPU."""

    def __init__(self, weight: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        self.host = weight.detach().to("cpu", copy=True)
        self.device = device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.cpu(), self.host).to(self.device, non_blocking=True)


def offload_embeddings(model: nn.Module) -> int:
    """Move a causal LM's input embedding table to host memory (not when tied to lm_head); returns GPU bytes freed."""
    emb = model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) or emb.weight.device.type == "cpu":
        return 0
    freed = emb.weight.numel() * emb.weight.element_size()
    model.set_input_embeddings(HostEmbedding(emb.weight, emb.weight.device))
    return freed


def _category(name: str) -> str:
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        if name.endswith("." + suffix):
            return "lm_head_quantized" if name.startswith("lm_head") else f"quantized_{suffix}"
    if "embed_tokens" in name:
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head"
    return "norms" if "norm" in name else "other"


def measure_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Bytes of every tensor in a folder's safetensors files by part (headers only, nothing loaded)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no .safetensors files")
    parts: dict[str, int] = {}
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            cat = _category(name)
            parts[cat] = parts.get(cat, 0) + end - start
    quantized = sum(v for k, v in parts.items() if k.startswith("quantized_"))
    return {"parts": {"quantized_linears": quantized, **dict(sorted(parts.items()))},
            "tensor_bytes": sum(parts.values()), "file_bytes": sum(f.stat().st_size for f in files),
            "folder_bytes": folder_size(folder)}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the stage


def _materialize(cfg: QuantizeConfig, folder: str, gguf: str | None, tokenizer: Any, scratch: Path) -> str:
    """GPTQModel loads Hugging Face folders: a .gguf source is dequantized into ``scratch`` first."""
    if not gguf:
        return folder
    from training.models import load_policy

    model = load_policy(cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"rank": 0})}),
                        trainable=False)
    model.hf_quantizer = None  # the weights are dequantized floats now; transformers would refuse to save them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(scratch, safe_serialization=True)
    tokenizer.save_pretrained(scratch)
    return str(scratch)


def gptq_config(opts: GPTQOptions) -> Any:
    from gptqmodel import QuantizeConfig as GPTQModelConfig

    return GPTQModelConfig(bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act, sym=opts.sym,
                           damp_percent=opts.damp_percent, damp_auto_increment=opts.damp_auto_increment,
                           true_sequential=opts.true_sequential, lm_head=opts.lm_head,
                           act_group_aware=False if opts.desc_act else opts.act_group_aware, mse=opts.mse,
                           gptaq=None if opts.gptaq_alpha is None else {"alpha": opts.gptaq_alpha})


def quantize_to(source: str, target: Path, cfg: QuantizeConfig, calibration: list[list[int]], tokenizer: Any,
                device: torch.device) -> float:
    """GPTQ ``source`` into ``target`` (must not exist); returns the seconds spent in load + quantize + save."""
    from gptqmodel import GPTQModel

    t0 = time.time()
    compute = _dtype(cfg.gptq.dtype, device)
    log.info("GPTQ computes in %s", str(compute).removeprefix("torch."))
    model = GPTQModel.load(source, gptq_config(cfg.gptq), device=str(device), dtype=compute)
    model.quantize([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration],
                   batch_size=cfg.gptq.batch_size, calibration_data_min_length=cfg.calibration.min_length)
    model.save(str(target))
    cast_unquantized_(target, _save_dtype(cfg.gptq, compute, json.loads((Path(source) / "config.json").read_text())))
    tokenizer.save_pretrained(target)  # the stage's tokenizer, with its chat template
    for stray in ("quant_log.csv",):
        (target / stray).unlink(missing_ok=True)
    del model
    return time.time() - t0


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``tmp`` folder (rename; the old copy is removed after)."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class QualityGateError(ConfigError):
    """The quantized model missed ``report.max_ppl_increase``."""


def run(cfg: QuantizeConfig) -> dict[str, Any]:
    """pre-flight -> tokenizer -> calibration -> GPTQ into a temp folder -> rename -> report -> manifest."""
    from training.artifacts import MANIFEST, atomic_write_json
    from training.checkpoint import write_manifest
    from training.config import dump_config
    from training.models import load_tokenizer

    started = time.time()
    out = Path(cfg.checkpoint.output_dir)
    device = _device(cfg.gptq.device)
    folder, gguf, hf = check_model(cfg)
    runner.check_writable(out)
    tokenizer = load_tokenizer(cfg.model)
    calibration, cal_texts = calibration_set(cfg, tokenizer)
    held = eval_set(cfg, tokenizer, cal_texts) if cfg.report.enabled else []
    log.info("model %s (%s), %d calibration samples (%d tokens), device %s", cfg.model.path, hf.model_type,
             len(calibration), sum(map(len, calibration)), device)

    (out / MANIFEST).unlink(missing_ok=True)  # the stage is incomplete from here until the new manifest lands
    for stale in out.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = out / f".tmp-source-{os.getpid()}"
    tmp = out / f".tmp-model-{os.getpid()}"
    try:
        source = _materialize(cfg, folder, gguf, tokenizer, scratch)
        seconds = quantize_to(source, tmp, cfg, calibration, tokenizer, device)
        if os.environ.get("QUANTIZE_CRASH_BEFORE_RENAME") == "1":  # fault injection for the atomicity test
            os._exit(17)
        _swap_in(tmp, out / "model")
        metrics: dict[str, Any] = {"quantize_seconds": round(seconds, 1),
                                   "compute_dtype": str(_dtype(cfg.gptq.dtype, device)).removeprefix("torch."),
                                   "calibration_samples": len(calibration),
                                   "calibration_tokens": sum(map(len, calibration)),
                                   "checkpoint_bytes": folder_size(out / "model"),
                                   "tensors": measure_checkpoint(out / "model")}
        src_files = list(Path(source).glob("*.safetensors")) or list(Path(folder).glob(gguf or "*.safetensors"))
        metrics["source_bytes"] = sum(f.stat().st_size for f in src_files)
        config_dict = json.loads((out / "model" / "config.json").read_text())
        metrics["memory_estimate"] = estimate_memory(config_dict, cfg.gptq.bits, cfg.gptq.group_size,
                                                     lm_head_bits=cfg.gptq.bits if cfg.gptq.lm_head else None)
        outputs = {"model": str(out / "model")}
        passed = True
        if cfg.report.enabled:
            report = quality_report(cfg, source, None if source == str(scratch) else gguf, out / "model", tokenizer,
                                    held, device)
            atomic_write_json(out / "quality.json", report)
            outputs["report"] = str(out / "quality.json")
            metrics.update(perplexity=report["perplexity"], gptq_vs_source=report["gptq_vs_source"])
            passed = report.get("passed", True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if not passed:
        raise QualityGateError(f"report.max_ppl_increase: GPTQ perplexity {metrics['perplexity']['gptq']:.3f} is "
                               f"{metrics['gptq_vs_source']:+.1%} over the source's "
                               f"{metrics['perplexity']['source']:.3f}; no manifest written")
    write_manifest(out, stage="quantize", config=dump_config(cfg), outputs=outputs, metrics=metrics, started=started,
                   inputs={"model": cfg.model.path, "calibration": cfg.calibration.data,
                           "architecture": hf.model_type})
    log.info("quantize complete: %s (%.1f MiB, %.0f s)", out / "model", metrics["checkpoint_bytes"] / 2**20, seconds)
    return metrics


def report_only(cfg: QuantizeConfig) -> dict[str, Any]:
    """Re-run the quality report for the checkpoint a finished run left in ``output_dir/model``."""
    from training.artifacts import atomic_write_json
    from training.models import load_tokenizer

    out = Path(cfg.checkpoint.output_dir)
    if not (out / "model" / "quantize_config.json").exists():
        raise ConfigError(f"checkpoint.output_dir: {out}/model holds no GPTQ checkpoint; run the stage first")
    device = _device(cfg.gptq.device)
    folder, gguf, _ = check_model(cfg)
    tokenizer = load_tokenizer(cfg.model)
    _, cal_texts = calibration_set(cfg, tokenizer)
    held = eval_set(cfg, tokenizer, cal_texts)
    report = quality_report(cfg, folder, gguf, out / "model", tokenizer, held, device)
    atomic_write_json(out / "quality.json", report)
    return report


# ----------------------------------------------------------------------------- CLI


def _memory_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m training.quantize memory",
                                description="Estimate (and, for a checkpoint folder, measure) GPU memory.")
    p.add_argument("path", help="A folder with config.json (and safetensors to measure) or a config.json file.")
    p.add_argument("--bits", type=int, default=None, help="Default: the folder's quantize_config.json, else 4.")
    p.add_argument("--group-size", type=int, default=None, help="Default: quantize_config.json, else 128.")
    p.add_argument("--lm-head-bits", type=int, default=None)
    p.add_argument("--embed-on-host", action="store_true", help="Keep the embedding table off the GPU.")
    p.add_argument("--kv-cache-bytes", type=int, default=2, choices=[1, 2], help="2 = fp16 KV cache, 1 = 8-bit.")
    p.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB)
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB)
    a = p.parse_args(argv)
    path = Path(a.path)
    cfg_file = path if path.is_file() else path / "config.json"
    if not cfg_file.exists():
        raise ConfigError(f"{a.path}: no config.json")
    qfile = cfg_file.parent / "quantize_config.json"
    q = json.loads(qfile.read_text()) if qfile.exists() else {}
    bits = a.bits or q.get("bits", 4)
    group = a.group_size or q.get("group_size", 128)
    lm_bits = a.lm_head_bits or (bits if q.get("lm_head") else None)
    result: dict[str, Any] = {"estimate": estimate_memory(
        json.loads(cfg_file.read_text()), bits, group, lm_head_bits=lm_bits, embed_on_gpu=not a.embed_on_host,
        kv_cache_bytes=a.kv_cache_bytes, budget_gib=a.budget_gib, reserve_gib=a.reserve_gib)}
    if path.is_dir() and any(path.glob("*.safetensors")):
        result["measured"] = measure_checkpoint(path)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from training.config import load_config, stage_arg_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("report", "memory") else "quantize"
    if command == "memory":
        return _memory_cli(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s quantize %(levelname)s %(message)s")
    args = stage_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(QuantizeConfig, args.config, args.overrides)
    result = report_only(cfg) if command == "report" else run(cfg)
    if command == "report":
        print(json.dumps({k: result[k] for k in ("perplexity", "gptq_vs_source", "generations")}, indent=2))
    return 0


if __name__ == "__main__":
    from training.runner import run_cli

    sys.exit(run_cli(main))
