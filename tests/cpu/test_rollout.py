"""PPO/GRPO rollouts through the serving engine (training.rollout) against the HF loop (ppo.sample), tiny random
Llama on CPU (the engine's torch attention path; CUDA graphs are GPU only: tests/gpu/bench_rollout.sh)."""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError, GenerationConfig, RolloutOptions, TrainConfig
from training.data import collate_prompts
from training.ppo import sample
from training.rollout import EngineRollout, HFRollout, check_plugin, make_rollout

PROMPTS = ["What is the capital of France?", "Hi", "Tell me a long story about the sea and the wind.", "Add two."]


@pytest.fixture()
def actor(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tok


def batch(tok, prompts=PROMPTS):
    b = collate_prompts([tok(p)["input_ids"] for p in prompts], pad_id=tok.pad_token_id)
    assert (b["attention_mask"] == 0).any()  # left padding is exercised
    return b["input_ids"], b["attention_mask"]


def engine_rollout(model, tok, eos_ids, rows=4, max_new=12, **opts):
    return EngineRollout(model, tok, eos_ids, torch.device("cpu"), RolloutOptions(**opts), torch.float32,
                         max_prompt_len=32, max_new_tokens=max_new, max_rows=rows)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "rollout_overlap"])
def test_greedy_engine_rollout_equals_hf_loop_with_padding_eos_and_stop_strings(actor, overlap):
    model, tok = actor
    ids, mask = batch(tok)
    free = GenerationConfig(max_new_tokens=12)
    seq0, _ = sample(model, ids, mask, free, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    P = ids.size(1)
    # a stop token from row 1's greedy answer and a stop string from the middle of row 0's: both rules fire
    eos_ids = sorted({tok.eos_token_id, int(seq0[1, P + 3])})
    text0 = tok.decode(seq0[0, P:].tolist(), skip_special_tokens=True)
    gen = GenerationConfig(max_new_tokens=12, stop=[text0[len(text0) // 2:len(text0) // 2 + 2]])
    want = sample(model, ids, mask, gen, eos_ids, tok.pad_token_id, greedy=True, tokenizer=tok)
    ro = engine_rollout(model, tok, eos_ids, rollout_overlap=overlap)
    assert ro.engine.opts.overlap_decode is overlap
    try:
        got = ro.generate(ids, mask, gen, greedy=True)
    finally:
        ro.close()
    lengths = want[1][:, P:].sum(1)
    assert lengths[1] <= 4 and lengths[0] < 12, lengths  # row 1 ended at its stop token, row 0 at the string
    answer0 = want[0][0, P:P + int(lengths[0])].tolist()
    assert gen.stop[0] in tok.decode(answer0, skip_special_tokens=True)
    assert gen.stop[0] not in tok.decode(answer0[:-1], skip_special_tokens=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "rollout_overlap"])
def test_sampled_engine_rollouts_are_reproducible_and_independent_of_batching(actor, overlap):
    model, tok = actor
    ids, mask = batch(tok)
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    ro = engine_rollout(model, tok, [tok.eos_token_id], rollout_overlap=overlap)
    try:
        a = ro.generate(ids, mask, gen, seed=123)
        b = ro.generate(ids, mask, gen, seed=123)
        c = ro.generate(ids, mask, gen, seed=124)
        tail = ro.generate(ids[2:], mask[2:], gen, seed=126)  # rows 2, 3 alone, with their seeds in the full batch
    finally:
        ro.close()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    P = ids.size(1)
    assert torch.equal(tail[0][:, :P], c[0][2:, :P])
    for i in (0, 1):  # same seeds, same answers whatever else is in the batch
        n = int(tail[1][i, P:].sum())
        assert torch.equal(tail[0][i, P:P + n], c[0][2 + i, P:P + n]) and int(c[1][2 + i, P:].sum()) == n


def test_a_rollouts_prompts_are_admitted_together_and_prefilled_in_one_forward(actor, monkeypatch):
    import serving.engine as se

    model, tok = actor
    ids, mask = batch(tok)
    groups: list[int] = []
    real = se.prefill_fresh
    monkeypatch.setattr(se, "prefill_fresh", lambda r, p, t: groups.append(len(p)) or real(r, p, t))
    ro = engine_rollout(model, tok, [tok.eos_token_id])
    singles = []
    one = ro.engine.runner.prefill
    ro.engine.runner.prefill = lambda *a, **k: singles.append(1) or one(*a, **k)
    try:
        for _ in range(3):  # every time, not by luck of thread timing (one inbox item: add_requests)
            ro.generate(ids, mask, GenerationConfig(max_new_tokens=4), greedy=True)
    finally:
        ro.close()
    assert groups == [len(ids)] * 3 and not singles


def test_top_k_one_samples_the_greedy_answer(actor):
    model, tok = actor
    ids, mask = batch(tok)
    ro = engine_rollout(model, tok, [tok.eos_token_id])
    try:
        greedy = ro.generate(ids, mask, GenerationConfig(max_new_tokens=8), greedy=True)
        top1 = ro.generate(ids, mask, GenerationConfig(max_new_tokens=8, temperature=1.5, top_k=1), seed=7)
    finally:
        ro.close()
    assert torch.equal(greedy[0], top1[0])


def _update(model, ids, mask, token: int, steps: int = 3) -> None:
    """A real optimizer update (AdamW on lm_head, in place) that makes ``token`` likelier everywhere."""
    opt = torch.optim.AdamW([model.lm_head.weight], lr=0.5)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = -logits[..., token].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("weights", ["shared", "copy"])
def test_engine_generates_from_the_updated_weights(actor, weights):
    model, tok = actor
    ids, mask = batch(tok)
    gen = GenerationConfig(max_new_tokens=8)
    ro = engine_rollout(model, tok, [tok.eos_token_id], rollout_weights=weights)
    try:
        before = ro.generate(ids, mask, gen, greedy=True)
        target = int(tok.convert_tokens_to_ids("<s>"))
        assert not (before[0][:, ids.size(1):] == target).all()
        with torch.no_grad():  # one weight, in place: the engine sees it
            model.lm_head.weight[target] += 50 * model.model.norm.weight.sign()
        after_one = ro.generate(ids, mask, gen, greedy=True)
        want_one = sample(model, ids, mask, gen, [tok.eos_token_id], tok.pad_token_id, greedy=True)
        model.train()
        _update(model, ids, mask, int(tok.convert_tokens_to_ids("<pad>")))
        model.eval()
        after = ro.generate(ids, mask, gen, greedy=True)
        want = sample(model, ids, mask, gen, [tok.eos_token_id], tok.pad_token_id, greedy=True)
        timings = ro.pop_timings()
    finally:
        ro.close()
    assert not torch.equal(after_one[0], before[0])
    assert torch.equal(after_one[0], want_one[0]) and torch.equal(after[0], want[0])
    assert not torch.equal(after[0], after_one[0])
    assert ro.rebuilds == 0 and ro.weights == weights
    assert timings["rollout_s"] > 0 and (timings["sync_s"] > 0) == (weights == "copy")


def test_compiled_engine_decode_gives_the_hf_loops_greedy_rollouts_and_sees_in_place_updates(actor, monkeypatch):
    """ppo.rollout_compile: the engine's decode layer compiled ("aot_eager" here: no C++/Triton build on the CPU
    machine) over the shared actor: greedy rollouts equal the HF loop's, also after an in-place weight change (the
    compiled norm weights are views of the live parameters), with 3 graph buckets instead of the ladder."""
    import serving.runner

    monkeypatch.setattr(serving.runner, "COMPILE_BACKEND", "aot_eager")
    model, tok = actor
    ids, mask = batch(tok)
    gen = GenerationConfig(max_new_tokens=8)
    ro = engine_rollout(model, tok, [tok.eos_token_id], rollout_compile=True, rollout_weights="shared")
    try:
        assert ro.engine.info["compiled_decode"] is True
        got = ro.generate(ids, mask, gen, greedy=True)
        want = sample(model, ids, mask, gen, [tok.eos_token_id], tok.pad_token_id, greedy=True)
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight.mul_(-3.0)
        got2 = ro.generate(ids, mask, gen, greedy=True)
        want2 = sample(model, ids, mask, gen, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    finally:
        ro.close()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got2[0], want2[0]) and not torch.equal(want2[0], want[0])
    assert EngineRollout.graph_batches(32, True) == [1, 8, 32] and EngineRollout.graph_batches(16, False) == [
        1, 2, 4, 8, 16]


def test_a_reallocated_parameter_rebuilds_the_engine(actor):
    model, tok = actor
    ids, mask = batch(tok)
    gen = GenerationConfig(max_new_tokens=6)
    ro = engine_rollout(model, tok, [tok.eos_token_id])
    try:
        ro.generate(ids, mask, gen, greedy=True)
        with torch.no_grad():
            model.model.norm.weight.data = -model.model.norm.weight.data.clone()  # new storage, not in place
        got = ro.generate(ids, mask, gen, greedy=True)
    finally:
        ro.close()
    want = sample(model, ids, mask, gen, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    assert ro.rebuilds == 1 and torch.equal(got[0], want[0])


def test_plugins_that_cannot_share_weights_are_config_errors_naming_the_way_out():
    with pytest.raises(ConfigError, match="rollout_engine=hf.*zero2"):
        check_plugin(TrainConfig(plugin="gemini"), "ppo")
    with pytest.raises(ConfigError, match="tp_size=2.*grpo.rollout_engine=hf"):
        check_plugin(TrainConfig(plugin="3d", tp_size=2), "grpo")
    check_plugin(TrainConfig(plugin="zero2"), "ppo")
    check_plugin(TrainConfig(plugin="3d", tp_size=1, zero_stage=1), "ppo")


def test_auto_picks_the_engine_unless_the_plugin_cannot_share_and_a_too_small_cache_is_refused(actor):
    model, tok = actor
    args = (model, tok, [tok.eos_token_id], torch.device("cpu"), 32, 4)
    ro = make_rollout(RolloutOptions(), GenerationConfig(), "ppo", TrainConfig(), *args)
    try:
        assert isinstance(ro, EngineRollout) and ro.weights == "shared"
    finally:
        ro.close()
    assert isinstance(make_rollout(RolloutOptions(), GenerationConfig(), "ppo", TrainConfig(plugin="gemini"), *args),
                      HFRollout)
    with pytest.raises(ConfigError, match="Gemini"):
        make_rollout(RolloutOptions(rollout_engine="serving"), GenerationConfig(), "ppo", TrainConfig(plugin="gemini"),
                     *args)
    with pytest.raises(ConfigError, match="rollout_kv_cache_gb"):
        engine_rollout(model, tok, [tok.eos_token_id], rollout_kv_cache_gb=1e-6)


def test_grpo_through_the_engine_gives_the_hf_loops_greedy_eval_answers(tiny_model, tmp_path):
    import json

    from conftest import run_stage
    from test_alignment import PROBE, grpo_config

    calls = {}
    for name in ("hf", "serving"):
        out, log = tmp_path / name, tmp_path / f"{name}.jsonl"
        cfg = grpo_config(tiny_model, tmp_path, out, [{"function": PROBE}], rollout_engine=name)
        run_stage("training.grpo", cfg, "train.max_steps=1", env={"REWARD_PROBE_LOG": str(log)})
        calls[name] = [json.loads(line) for line in log.read_text().splitlines()]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["inputs"]["rollout"]["engine"] == name
        from training.metrics import read_metrics

        assert read_metrics(out)[0]["rollout_s"] > 0
    # eval before training (greedy, the initial policy): the same answers; then G=4 samples of 2 prompts each
    assert calls["serving"][0]["completions"] == calls["hf"][0]["completions"]
    assert [len(c["completions"]) for c in calls["serving"]] == [3, 8, 3]


def test_engine_imports_without_the_api_stack():
    """Training imports serving's engine for rollouts on machines that have only the training stack (the GPU
    test machine: torch, transformers, colossalai, pydantic). An import of starlette reached from
    serving.config once failed every engine rollout there; this blocks the API-only packages and imports the
    engine and the stages that use it."""
    import subprocess
    import sys
    code = (
        "import sys, importlib.abc\n"
        "BLOCK = {'starlette', 'fastapi', 'ray', 'prometheus_client', 'uvicorn', 'xgrammar', 'openai', 'httpx'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCK:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import serving.engine, training.rollout, training.ppo, training.grpo\n"
        "from serving.engine import EngineConfig, LLMEngine, SamplingParams\n"
        "print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]
