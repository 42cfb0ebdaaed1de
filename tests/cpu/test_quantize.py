"""The GPTQ stage on a tiny random Llama: CLI end to end, the standard checkpoint format, both loaders, the
quality report, the memory estimate against real tensors, atomic output and clear errors on bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CORPUS, make_tiny_llama, run_stage, write_jsonl

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
ENV = {"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def chat_rows(n: int) -> list[dict]:
    pairs = itertools.islice(itertools.cycle(itertools.permutations(CORPUS, 2)), n)
    return [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": (b + " ") * 3}]}
            for a, b in pairs]


def write_config(tmp: Path, model: Path, out: Path, **extra) -> Path:
    cfg = {"model": {"path": str(model)}, "gptq": {"bits": 4, "group_size": 32},
           "calibration": {"data": [str(write_jsonl(tmp / "cal.jsonl", chat_rows(30)))], "num_samples": 12,
                           "max_length": 96},
           "report": {"eval": {"data": [str(write_jsonl(tmp / "held.jsonl", chat_rows(30)[::-1]))], "num_samples": 4,
                               "max_length": 64, "min_length": 16},
                      "prompts": ["Hello, how are you?"], "max_new_tokens": 4},
           "checkpoint": {"output_dir": str(out)}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp / "quantize.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A killed run (before the rename), then a full run in the same folder, through the CLI."""
    tmp = tmp_path_factory.mktemp("quantize")
    model = make_tiny_llama(tmp / "src", hidden=64, layers=2)
    out = tmp / "out"
    config = write_config(tmp, model, out)
    crashed = run_stage("training.quantize", config, env={**ENV, "QUANTIZE_CRASH_BEFORE_RENAME": "1"}, check=False)
    after_crash = sorted(p.name for p in out.iterdir())
    run_stage("training.quantize", config, env=ENV)
    return {"tmp": tmp, "src": model, "out": out, "config": config, "crash_rc": crashed.returncode,
            "after_crash": after_crash, "manifest": json.loads((out / "manifest.json").read_text()),
            "quality": json.loads((out / "quality.json").read_text())}


def test_killed_run_leaves_nothing_loadable_and_rerun_cleans_up(run):
    assert run["crash_rc"] == 17
    assert "model" not in run["after_crash"] and "manifest.json" not in run["after_crash"]
    assert any(n.startswith(".tmp-model-") for n in run["after_crash"])
    assert sorted(p.name for p in run["out"].iterdir()) == ["manifest.json", "model", "quality.json"]


def test_checkpoint_has_the_standard_gptq_format(run):
    folder = run["out"] / "model"
    assert run["manifest"]["outputs"]["model"] == str(folder)
    q = json.loads((folder / "quantize_config.json").read_text())
    assert (q["bits"], q["group_size"], q["desc_act"], q["sym"], q["quant_method"]) == (4, 32, False, True, "gptq")
    assert q["checkpoint_format"] == "gptq"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert (folder / "tokenizer.json").exists() and "im_start" in (folder / "chat_template.jinja").read_text()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer, name in itertools.product(range(2), LINEARS):
            prefix = f"model.layers.{layer}.{'mlp' if 'proj' in name and name[0] in 'gud' else 'self_attn'}.{name}"
            in_f = 128 if name == "down_proj" else 64
            out_f = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64}.get(name, 128 if name != "down_proj"
                                                                                 else 64)
            assert prefix + ".weight" not in keys
            shapes = {t: (tuple(f.get_slice(f"{prefix}.{t}").get_shape()), f.get_slice(f"{prefix}.{t}").get_dtype())
                      for t in ("qweight", "qzeros", "scales", "g_idx")}
            assert shapes == {"qweight": ((in_f // 8, out_f), "I32"), "qzeros": ((in_f // 32, out_f // 8), "I32"),
                              "scales": ((in_f // 32, out_f), "F16"), "g_idx": ((in_f,), "I32")}, prefix
        # whatever GPTQ computed in (float32 on a CPU without native bfloat16), the rest is stored in 16 bits
        saved = {f.get_slice(k).get_dtype() for k in keys if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    compute = run["manifest"]["metrics"]["compute_dtype"]
    assert compute in ("float32", "bfloat16")
    expected = "float16" if compute == "float32" else compute  # the tiny source is float32: its 16-bit form is fp16
    assert saved == {{"float16": "F16", "bfloat16": "BF16"}[expected]}
    assert json.loads((folder / "config.json").read_text())["dtype"] == expected


def _unpack(x: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit values, low bits first, spread along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:
        return ((x.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, x.shape[1])
    return ((x.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF).reshape(x.shape[0], -1)


def test_independent_dequantization_reproduces_both_loaders(run):
    """Unpack the tensors by the GPTQ format's definition into a plain Llama; GPTQModel and transformers' GPTQ
    integration (offline) must compute the same logits, and greedy generation must run through both."""
    from gptqmodel import GPTQModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    folder = run["out"] / "model"
    state = load_file(str(folder / "model.safetensors"))
    ref = LlamaForCausalLM.from_pretrained(run["src"], dtype=torch.float32).eval()
    source_w = {n: p.detach().clone() for n, p in ref.named_parameters()}
    new_state = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        q = _unpack(state[key], 0).float()
        z = _unpack(state[prefix + ".qzeros"], 1).float() + 1  # the gptq (v1) format stores zero - 1
        g = state[prefix + ".g_idx"].long()
        w = (state[prefix + ".scales"].float()[g] * (q - z[g])).t()
        new_state[prefix + ".weight"] = w
        err = (w - source_w[prefix + ".weight"]).norm() / source_w[prefix + ".weight"].norm()
        assert 0 < err < 0.25, (prefix, err)
    for k, v in state.items():
        if not k.endswith(("qweight", "qzeros", "scales", "g_idx")):
            new_state[k] = v.float()
    ref.load_state_dict(new_state, strict=True)
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11]])
    expected = ref(input_ids=ids).logits.float()

    gm = GPTQModel.load(str(folder), device="cpu", backend="torch")
    got = gm.model(input_ids=ids).logits.float()
    assert torch.allclose(got, expected, atol=0.05, rtol=0.05), (got - expected).abs().max()
    assert gm.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 11)

    hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert any(hasattr(m, "qweight") for m in hf.modules())
    got_hf = hf(input_ids=ids).logits.float()
    assert torch.allclose(got_hf, expected, atol=0.05, rtol=0.05), (got_hf - expected).abs().max()
    assert hf.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 11)


def test_report_numbers_come_from_real_evaluation(run):
    """The report's source perplexity is recomputed here with transformers' own loss on the same held-out samples."""
    from transformers import AutoModelForCausalLM

    from training.config import load_config
    from training.models import load_tokenizer
    from training.quantize import QuantizeConfig, calibration_set, eval_set

    rep = run["quality"]
    assert run["manifest"]["metrics"]["perplexity"] == rep["perplexity"]
    cfg = load_config(QuantizeConfig, run["config"])
    tok = load_tokenizer(cfg.model)
    _, cal_texts = calibration_set(cfg, tok)
    held = eval_set(cfg, tok, cal_texts)
    assert len(held) == rep["eval_samples"] == 4 and sum(map(len, held)) == rep["eval_tokens"]
    model = AutoModelForCausalLM.from_pretrained(run["src"], dtype=torch.float32).eval()
    nll = n = 0.0
    with torch.no_grad():
        for ids in held:
            x = torch.tensor([ids])
            nll += model(input_ids=x, labels=x).loss.item() * (len(ids) - 1)
            n += len(ids) - 1
    assert rep["perplexity"]["source"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    ppl = rep["perplexity"]
    assert ppl["gptq"] != ppl["source"] and ppl["rtn"] != ppl["source"]
    assert all(0.5 < ppl[k] / ppl["source"] < 2 for k in ("gptq", "rtn"))
    assert set(rep["generations"]) == {"source", "rtn", "gptq"}
    assert all(len(g) == 1 for g in rep["generations"].values())


def test_report_command_reproduces_the_stage_report(run):
    from training.quantize import main

    report = run["out"] / "quality.json"
    report.unlink()
    assert main(["report", "--config", str(run["config"])]) == 0
    again = json.loads(report.read_text())
    for k in ("source", "rtn", "gptq"):
        assert again["perplexity"][k] == pytest.approx(run["quality"]["perplexity"][k], rel=1e-3)


def test_memory_estimate_equals_measured_tensor_bytes(run, capsys):
    from training.quantize import main

    assert main(["memory", str(run["out"] / "model")]) == 0
    res = json.loads(capsys.readouterr().out)
    est, meas = res["estimate"]["parts"], res["measured"]["parts"]
    for k in ("quantized_qweight", "quantized_qzeros", "quantized_scales", "quantized_g_idx", "embed_tokens",
              "lm_head", "norms"):
        assert est[k] == meas[k], k
    assert res["estimate"]["weights_gpu_bytes"] == res["measured"]["tensor_bytes"]
    assert run["manifest"]["metrics"]["tensors"]["tensor_bytes"] == res["measured"]["tensor_bytes"]


def test_estimate_for_llama_7b():
    from training.quantize import GIB, estimate_memory

    e = estimate_memory(LLAMA_7B, 4, 128)
    linear_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert e["parts"]["quantized_qweight"] == linear_params // 2
    assert e["parts"]["quantized_scales"] == linear_params // 128 * 2
    assert e["parts"]["embed_tokens"] == e["parts"]["lm_head"] == 32000 * 4096 * 2
    assert e["kv_cache_bytes_per_token"] == 2 * 32 * 4096 * 2  # 0.5 MiB a token in fp16
    assert 3.5 < e["weights_gpu_gib"] < 3.8
    assert e["fp16_weights_bytes"] == (linear_params + 2 * 32000 * 4096 + 65 * 4096) * 2
    lean = estimate_memory(LLAMA_7B, 4, 128, embed_on_gpu=False, lm_head_bits=4, kv_cache_bytes=1)
    saved = e["weights_gpu_bytes"] - lean["weights_gpu_bytes"]
    assert saved > 0.4 * GIB and lean["kv_cache_bytes_per_token"] == e["kv_cache_bytes_per_token"] // 2
    assert lean["kv_tokens"] > e["kv_tokens"]
    assert lean["kv_tokens"] == lean["kv_budget_bytes"] // lean["kv_cache_bytes_per_token"]


def test_rtn_matches_the_gptq_grid():
    from training.quantize import fake_quantize

    torch.manual_seed(0)
    w = torch.randn(8, 96)
    for sym in (True, False):
        q = fake_quantize(w, 4, 32, sym)
        for grp in range(3):
            block, orig = q[:, grp * 32:(grp + 1) * 32], w[:, grp * 32:(grp + 1) * 32]
            for row in range(8):
                assert block[row].unique().numel() <= 16
                step = (orig[row].abs().max() * 2 if sym else orig[row].max().clamp(min=0) - orig[row].min()
                        .clamp(max=0)) / 15
                assert (block[row] - orig[row]).abs().max() <= step / 2 + 1e-5
    ragged = fake_quantize(w[:, :80], 4, 32, True)  # last group of 16 columns
    assert ragged.shape == (8, 80) and (ragged - w[:, :80]).abs().max() < 0.5


@pytest.mark.parametrize("case", ["unknown_architecture", "no_gptq_support", "too_little_calibration",
                                  "output_not_writable", "bad_field"])
def test_bad_input_fails_before_quantizing(case, tmp_path, tiny_model, capsys):
    from training.quantize import main
    from training.runner import run_cli

    model, out, extra, overrides = tiny_model, tmp_path / "out", {}, []
    if case == "unknown_architecture":
        model = tmp_path / "weird"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["X"]}))
    elif case == "no_gptq_support":
        from transformers import BertConfig

        model = tmp_path / "bert"
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
            model)
    elif case == "too_little_calibration":
        extra = {"calibration": {"data": [str(write_jsonl(tmp_path / "few.jsonl", chat_rows(3)))],
                                 "min_samples": 8}}
    elif case == "output_not_writable":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
    else:
        overrides = ["gptq.bits=5"]
    config = write_config(tmp_path, model, out, **extra)
    assert run_cli(lambda: main(["--config", str(config), *overrides])) == 2
    err = capsys.readouterr().err
    expected = {"unknown_architecture": "unknown architecture", "no_gptq_support": "has no GPTQ support",
                "too_little_calibration": "calibration.data: only 3 samples",
                "output_not_writable": "checkpoint.output_dir", "bad_field": "gptq.bits"}[case]
    assert expected in err, err
    assert not (out / "model").exists()


def test_clipping_search_and_gptaq_reach_gptqmodel_and_change_the_weights(run):
    """`gptq.mse`, `gptq.gptaq_alpha` and `gptq.dtype=float32` go to GPTQModel (recorded in the checkpoint's
    meta) and give other integer weights than the plain run on the same data; the format stays standard."""
    from safetensors.torch import load_file

    tmp = run["tmp"]
    out = tmp / "out-mse"
    config = write_config(tmp, run["src"], out, gptq={"mse": 2.4, "gptaq_alpha": 0.25, "dtype": "float32"},
                          report={"enabled": False})
    run_stage("training.quantize", config, env=ENV)
    q = json.loads((out / "model" / "quantize_config.json").read_text())
    assert (q["quant_method"], q["checkpoint_format"], q["bits"], q["group_size"]) == ("gptq", "gptq", 4, 32)
    meta = json.dumps(q.get("meta", q))
    assert '"mse": 2.4' in meta and '"alpha": 0.25' in meta, meta
    plain, tuned = load_file(str(run["out"] / "model" / "model.safetensors")), load_file(
        str(out / "model" / "model.safetensors"))
    assert plain.keys() == tuned.keys()
    changed = [k for k in plain if k.endswith(".qweight") and not torch.equal(plain[k], tuned[k])]
    assert changed, "the options changed no quantized weight"
