"""DPO and GRPO: their losses as tensor functions, and both stages end to end through their CLIs on a tiny random
Llama (ColossalAI ddp plugin, CPU), including kill + --resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_stage, write_jsonl
from test_stages import QUESTIONS, base_config, losses_by_step, preference_rows, write_config

from training.config import ConfigError, GRPOConfig, import_function, load_config
from training.metrics import read_metrics

# ----------------------------------------------------------------------------- DPO


def dpo_config(tiny_model: Path, tmp_path: Path, out: Path, **dpo) -> Path:
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_rows() * 2)
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(offset=1))
    cfg = base_config(tiny_model, [str(train)], out, max_steps=10, micro_batch_size=8, lr=1e-3)
    cfg["data"]["eval"] = [str(held)]
    cfg["dpo"] = {"beta": 0.5, **dpo}
    return write_config(tmp_path / f"{out.name}.yaml", cfg)


def test_dpo_loss_falls_and_held_out_implicit_accuracy_rises_on_separable_pairs(tiny_model, tmp_path):
    out = tmp_path / "dpo"
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, out))

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference: chance
    assert rows[0]["acc"] == 0.0 and rows[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["stage"] == "dpo" and m["eval_pairs"] == 8
    assert m["eval_acc"] >= 0.875 and m["eval_margin"] > 0, m  # held-out pairs (other answers), not memorised ones
    assert manifest["inputs"]["reference_logps_reused"] is False
    assert (out / "model" / "config.json").exists() and list((out / "tensorboard").iterdir())


def test_dpo_gradient_vanishes_as_beta_goes_to_zero(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data import collate_dpo, parse_preference, tokenize_preference
    from training.dpo import pair_logprobs
    from training.losses import dpo_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = [tokenize_preference(parse_preference(r), tok, 64) for r in preference_rows()[:4]]
    batch = collate_dpo(examples, pad_id=tok.pad_token_id)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        ref_c, ref_r = pair_logprobs(ref, batch)
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():  # move the policy off the reference, or every gradient is symmetric
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def grad_norm(beta: float) -> float:
        policy.zero_grad()
        c, r = pair_logprobs(policy, batch)
        loss, _, _ = dpo_loss(c, r, ref_c, ref_r, beta)
        loss.backward()
        return float(torch.sqrt(sum((p.grad ** 2).sum() for p in policy.parameters() if p.grad is not None)))

    norms = {beta: grad_norm(beta) for beta in (1.0, 1e-2, 1e-4, 1e-8)}
    assert norms[1.0] > 1e-3
    assert norms[1e-2] < 0.05 * norms[1.0] and norms[1e-4] < 1e-3 * norms[1.0], norms  # |dL/dlogp| <= beta
    assert norms[1e-8] < 1e-6, norms


def test_dpo_loss_and_ipo_match_their_formulas():
    from training.losses import dpo_loss

    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.5])
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.2)
    h = (pc - rc) - (pr - rr)  # [1.0, -0.5]
    assert torch.allclose(r_c, 0.2 * (pc - rc)) and torch.allclose(r_r, 0.2 * (pr - rr))
    assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(0.2 * h).mean()), rel=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, kind="ipo")
    assert ipo.item() == pytest.approx(float(((h - 2.5) ** 2).mean()), rel=1e-6)
    eps = 0.1  # conservative DPO: the label is wrong with probability eps
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=eps)
    ls = torch.nn.functional.logsigmoid
    assert smooth.item() == pytest.approx(float((-(1 - eps) * ls(0.2 * h) - eps * ls(-0.2 * h)).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.2, kind="ipo", label_smoothing=eps)


def test_conservative_dpo_stops_pushing_a_confident_margin():
    """With label smoothing the gradient on the margin vanishes at a finite margin, log((1 - eps) / eps) / beta of
    log-ratio, and turns back beyond it; plain DPO's keeps pushing."""
    from training.losses import dpo_loss

    beta, eps = 0.5, 0.1
    grads = {}
    for smoothing in (0.0, eps):
        for h in (1.0, math.log((1 - eps) / eps) / beta, 8.0):
            pc = torch.tensor([h], requires_grad=True)
            loss, _, _ = dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta,
                                  label_smoothing=smoothing)
            loss.backward()
            grads[(smoothing, round(h, 3))] = pc.grad.item()
    plain = [g for (sm, _), g in grads.items() if sm == 0.0]
    smooth = [g for (sm, _), g in grads.items() if sm == eps]
    assert all(g < 0 for g in plain)  # descent raises the chosen log-prob at every margin
    assert smooth[0] < 0 and smooth[1] == pytest.approx(0.0, abs=1e-6) and smooth[2] > 0


def test_dpo_precomputed_reference_logprobs_equal_a_fresh_pass_and_a_live_reference(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data import collate_dpo, load_rows, tokenize_preference
    from training.dpo import REFERENCE_FILE, pair_logprobs

    pre, live = tmp_path / "pre", tmp_path / "live"
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, pre), "train.max_steps=3")
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, live, precompute_reference=False),
              "train.max_steps=3")

    stored = torch.load(pre / REFERENCE_FILE, weights_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows, _ = load_rows([str(tmp_path / "pairs.jsonl")], "preference")
    examples = [tokenize_preference(r, tok, 64) for r in rows]
    ref = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():  # a fresh pass, one pair at a time (no padding shared with other pairs)
        fresh = torch.tensor([[float(x) for x in pair_logprobs(ref, collate_dpo([ex], pad_id=tok.pad_token_id))]
                              for ex in examples])
    assert stored["train"].shape == (16, 2) and stored["eval"].shape == (8, 2)
    assert torch.allclose(stored["train"], fresh, atol=1e-4), (stored["train"] - fresh).abs().max()
    assert (stored["train"][:, 0] != stored["train"][:, 1]).all()
    for key in ("loss", "acc", "margin"):  # training against stored numbers = training against the live model
        assert losses_by_step(pre, key) == pytest.approx(losses_by_step(live, key), rel=1e-4, abs=1e-6), key
    assert not (live / REFERENCE_FILE).exists()


def test_dpo_kill_and_resume_matches_uninterrupted_run_and_reuses_reference_logprobs(tiny_model, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, straight), "train.max_steps=5",
              "data.shuffle=true", "train.micro_batch_size=4")
    cfg = dpo_config(tiny_model, tmp_path, killed)
    args = ("train.max_steps=5", "data.shuffle=true", "train.micro_batch_size=4", "checkpoint.save_every=2")
    proc = run_stage("training.dpo", cfg, *args, env={"TRAINING_CRASH_AFTER_STEP": "3"}, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000002"
    run_stage("training.dpo", cfg, *args, "--resume")

    for key in ("loss", "acc", "margin"):
        assert losses_by_step(killed, key) == pytest.approx(losses_by_step(straight, key), rel=1e-5, abs=1e-6)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["inputs"]["reference_logps_reused"] is True
    assert manifest["metrics"]["eval_acc"] == pytest.approx(
        json.loads((straight / "manifest.json").read_text())["metrics"]["eval_acc"])


# ----------------------------------------------------------------------------- GRPO

PROBE = "tests.cpu.reward_probe:longer_is_better"
HELD_OUT = ["Name a color.", "Count to two.", "Say hello."]


def test_group_advantages_are_zero_mean_per_group():
    from training.losses import group_advantages

    torch.manual_seed(0)
    rewards = torch.randn(12) * 3 + 1
    adv = group_advantages(rewards, group_size=4)
    groups = adv.view(3, 4)
    assert torch.allclose(groups.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(groups.std(1, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.equal(groups.argsort(1), rewards.view(3, 4).argsort(1))  # in a group, better answer: larger advantage
    centred = group_advantages(rewards, group_size=4, scale=False)
    assert torch.allclose(centred.view(3, 4), rewards.view(3, 4) - rewards.view(3, 4).mean(1, keepdim=True))
    same = group_advantages(torch.tensor([2.0, 2.0, 2.0, 0.0, 1.0, 0.0]), group_size=3)
    assert torch.equal(same[:3], torch.zeros(3)) and torch.isfinite(same).all()  # all tied: nothing to learn
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_grpo_loss_kl_is_zero_at_the_reference_and_pushes_up_good_answers():
    from training.losses import grpo_loss, kl_k3

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(kl_k3(logp.detach(), logp.detach(), mask), torch.zeros(2, 3))
    assert (kl_k3(logp.detach(), logp.detach() - 0.3, mask)[mask.bool()] > 0).all()
    loss, parts = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, kl_coef=0.1)
    loss.backward()
    assert float(parts["kl_loss"]) == 0.0 and float(parts["clip_frac"]) == 0.0
    assert (logp.grad[0] < 0).all() and (logp.grad[1, :2] > 0).all()  # descent raises row 0, lowers row 1
    assert logp.grad[1, 2] == 0  # padding gets no gradient


def test_rule_based_arithmetic_reward_and_its_shipped_task():
    from conftest import ROOT

    from training.rewards import answer_format, arithmetic_correct, arithmetic_rows, write_task

    prompts = ["What is 12 + 30? Reply with the result", "What is 9 - 4? Answer", "Tell me a joke.",
               "What is 17 + 39?", "What is 10 - 5?", "What is 10 - 5?"]
    completions = ["12 plus 30 is 42.\nAnswer: 42", "Answer: 6", "Answer: 1", "17 + 39 = 56.", "What is 10 - 5?",
                   "10 - 5 = 5"]
    assert arithmetic_correct(prompts=prompts, completions=completions, messages=[]) == [1, 0, 0, 1, 0, 1]
    assert answer_format(prompts=prompts, completions=completions) == [1, 1, 1, 0, 0, 0]
    assert answer_format(prompts=prompts[:2], completions=["42", "Answer: five"]) == [0.0, 0.0]
    rows = arithmetic_rows(50, seed=3)
    assert arithmetic_correct([r["prompt"] for r in rows], ["Answer: -1"] * 50) == [0.0] * 50  # results are >= 0
    shipped = ROOT / "training" / "demo_data"
    fresh = write_task(Path(__import__("tempfile").mkdtemp()))
    for f in fresh:  # the shipped files are what the generator writes
        assert (shipped / f.name).read_text() == f.read_text(), f.name


def test_bad_reward_import_path_is_a_config_error_naming_the_field(tiny_model, tmp_path):
    def cfg_with(fn: str) -> Path:
        cfg = base_config(tiny_model, [str(tmp_path / "p.jsonl")], tmp_path / "g")
        cfg["grpo"] = {"rewards": [{"model": str(tiny_model)}, {"function": fn, "weight": 0.5}]}
        return write_config(tmp_path / "g.yaml", cfg)

    for fn, why in (("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
                    ("training.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
                    ("training.rewards", "pkg.module:function"),
                    ("tests.cpu.reward_probe:NOT_CALLABLE", "is not callable")):
        with pytest.raises(ConfigError) as e:
            load_config(GRPOConfig, cfg_with(fn))
        assert "grpo.rewards.1.function" in str(e.value) and why in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="grpo.rewards.0: .*exactly one of function"):
        load_config(GRPOConfig, cfg_with(PROBE), ["grpo.rewards=[{weight: 1.0}]"])
    proc = run_stage("training.grpo", cfg_with("no_such_pkg.mod:fn"), check=False)
    assert proc.returncode == 2 and "grpo.rewards.1.function" in proc.stderr and "no_such_pkg" in proc.stderr


def test_a_reward_function_that_misbehaves_is_named():
    from training.config import RewardSpec
    from training.data import Prompt
    from training.grpo import RewardTerm, score

    seq, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    prompts = [Prompt([{"role": "user", "content": "What is 1 + 1?"}])] * 2
    for fn, why in (("tests.cpu.reward_probe:wrong_count", "returned 1 values for 2 completions"),
                    ("tests.cpu.reward_probe:raises", "failed: KeyError")):
        term = RewardTerm(RewardSpec(function=fn), "grpo.rewards.0.function", fn=import_function(fn))
        with pytest.raises((ConfigError, RuntimeError), match=f"grpo.rewards.0.function: {fn} .*{why}"):
            score([term], seq, mask, prompts, ["Answer: 2", "3"], clip=10.0)
    ok = RewardTerm(RewardSpec(function="training.rewards:arithmetic_correct", weight=2.0), "f",
                    fn=import_function("training.rewards:arithmetic_correct"))
    total, parts = score([ok], seq, mask, prompts, ["Answer: 2", "3"], clip=10.0)
    assert total.tolist() == [2.0, 0.0] and parts["arithmetic_correct"].tolist() == [1.0, 0.0]


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> Path:
    """A reward model folder (random head) made the way the RM stage starts one."""
    from transformers import AutoTokenizer

    from training.config import ModelConfig
    from training.models import load_value_model

    out = tmp_path_factory.mktemp("rm") / "model"
    load_value_model(ModelConfig(path=str(tiny_model))).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def grpo_config(tiny_model: Path, tmp_path: Path, out: Path, rewards: list[dict], **grpo) -> Path:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": q} for q in QUESTIONS])
    held = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": q} for q in HELD_OUT])
    cfg = base_config(tiny_model, [str(prompts)], out, max_steps=3, micro_batch_size=4, lr=1e-3)
    cfg["data"]["eval"] = [str(held)]
    cfg["grpo"] = {"rewards": rewards, "group_size": 4, "rollout_batch_size": 2, "ppo_epochs": 2, "kl_coef": 0.1,
                   "generation": {"max_new_tokens": 8, "temperature": 1.0, "top_k": 20}, **grpo}
    return write_config(tmp_path / f"{out.name}.yaml", cfg)


def test_grpo_calls_the_reward_function_by_import_path_with_the_documented_arguments(tiny_model, reward_model,
                                                                                     tmp_path):
    out, log = tmp_path / "grpo", tmp_path / "calls.jsonl"
    rewards = [{"function": PROBE, "weight": 0.5}, {"model": str(reward_model), "weight": 1.0}]
    run_stage("training.grpo", grpo_config(tiny_model, tmp_path, out, rewards), env={"REWARD_PROBE_LOG": str(log)})

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # eval before (3 held-out prompts), 3 steps of 2 prompts x G=4 samples, eval after
    assert [len(c["completions"]) for c in calls] == [3, 8, 8, 8, 3]
    assert calls[0]["prompts"] == HELD_OUT and calls[-1]["prompts"] == HELD_OUT
    assert calls[0]["messages"] == [[{"role": "user", "content": q}] for q in HELD_OUT]
    for c in calls[1:4]:
        assert all(p in QUESTIONS for p in c["prompts"])
        assert [c["prompts"][i] for i in range(0, 8, 4)] == [c["prompts"][i + 3] for i in range(0, 8, 4)]  # groups
        assert c["messages"] == [[{"role": "user", "content": p}] for p in c["prompts"]]
        assert all(isinstance(x, str) and "<|im_end|>" not in x for x in c["completions"])
        assert c["extra"] == []
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["kl"]) < 1e-5  # the policy is the reference before the first update
    for key in ("reward", "reward_longer_is_better", "reward_rm", "policy_loss", "kl_loss", "clip_frac",
                "reward_group_std", "response_length", "grad_norm"):
        assert all(key in r for r in rows), key
    probe = [sum(len(x) / 10 for x in c["completions"]) / 8 for c in calls[1:4]]
    assert [r["reward_longer_is_better"] for r in rows] == pytest.approx(probe, rel=1e-4)
    for r in rows:
        assert r["reward"] == pytest.approx(0.5 * r["reward_longer_is_better"] + r["reward_rm"], rel=1e-4, abs=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "grpo" and manifest["outputs"]["model"] == str(out / "model")
    m = manifest["metrics"]
    assert m["eval_longer_is_better_before"] == pytest.approx(sum(len(x) / 10 for x in calls[0]["completions"]) / 3,
                                                              rel=1e-4)
    assert {"eval_rm_before", "eval_rm_after", "eval_reward_before", "eval_reward_after"} <= set(m)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not torch.equal(trained.lm_head.weight, AutoModelForCausalLM.from_pretrained(tiny_model).lm_head.weight)


def test_grpo_kill_and_resume_matches_uninterrupted_run(tiny_model, reward_model, tmp_path):
    rewards = [{"function": PROBE}, {"model": str(reward_model), "weight": 0.5}]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_stage("training.grpo", grpo_config(tiny_model, tmp_path, straight, rewards))
    cfg = grpo_config(tiny_model, tmp_path, killed, rewards)
    proc = run_stage("training.grpo", cfg, "checkpoint.save_every=1", env={"TRAINING_CRASH_AFTER_STEP": "2"},
                     check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert {"model", "model.optim", "model.sched", "state.json"} <= {
        p.name for p in (killed / "checkpoints" / "step-000001").iterdir()}
    run_stage("training.grpo", cfg, "checkpoint.save_every=1", "--resume")
    for key in ("reward", "kl", "policy_loss", "kl_loss", "response_length"):
        assert losses_by_step(killed, key) == pytest.approx(losses_by_step(straight, key), rel=1e-4, abs=1e-6), key
    a, b = (json.loads((d / "manifest.json").read_text())["metrics"] for d in (straight, killed))
    assert b["eval_reward_before"] == pytest.approx(a["eval_reward_before"])
    assert b["eval_reward_after"] == pytest.approx(a["eval_reward_after"], rel=1e-4)


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_runs_alignment_dpo_then_grpo_end_to_end_and_quantizes_their_output(tiny_model, tmp_path):
    from test_pipeline import DEMO, _stage_configs, record, run_pipeline

    runs = tmp_path / "runs"
    cfgs = _stage_configs(tmp_path, tiny_model)
    common = {"train": {"plugin": "ddp", "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
              "log": {"every": 1, "tensorboard": False, "progress": False}}
    cfgs["dpo"] = {"model": {"path": str(runs / "sft")},
                   "data": {"train": [str(DEMO / "preference_en.jsonl")], "max_samples": 12, "max_length": 128,
                            "eval_fraction": 0.25},
                   **common, "train": {**common["train"], "max_steps": 3},
                   "checkpoint": {"output_dir": str(runs / "dpo"), "save_every": 1}, "dpo": {"beta": 0.1}}
    cfgs["grpo"] = {"model": {"path": str(runs / "sft")},
                    "data": {"train": [str(DEMO / "arithmetic_train.jsonl")],
                             "eval": [str(DEMO / "arithmetic_eval.jsonl")], "max_samples": 8, "max_length": 64},
                    **common, "train": {**common["train"], "max_steps": 2, "micro_batch_size": 4},
                    "checkpoint": {"output_dir": str(runs / "grpo"), "save_every": 1},
                    "grpo": {"rewards": [{"function": "training.rewards:arithmetic_correct"},
                                         {"function": "training.rewards:answer_format", "weight": 0.2}],
                             "group_size": 2, "rollout_batch_size": 2, "generation": {"max_new_tokens": 6}}}
    stages = []
    for name in ("sft", "rm", "ppo", "dpo", "grpo", "quantize"):
        if name in cfgs:
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfgs[name]))
            stages.append({"name": name, "config": str(tmp_path / f"{name}.yaml")})
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "run_dir": str(runs), "env": {"GPTQMODEL_CPU_WORKERS": "2"},
                                      "alignment": "dpo", "stages": stages}))
    quantize = "quantize" in cfgs

    dpo = run_pipeline(config)
    assert dpo.returncode == 0, dpo.stdout[-3000:] + dpo.stderr[-6000:]
    rec = record(tmp_path)
    assert list(rec) == ["sft", "dpo", *(["quantize"] if quantize else [])]  # DPO needs no RM: it never ran
    assert all(r["status"] == "ran" for r in rec.values()), rec
    assert not (runs / "rm").exists() and not (runs / "ppo").exists() and not (runs / "grpo").exists()
    assert rec["dpo"]["metric"] == "eval_acc" and rec["dpo"]["model"] == str(runs / "dpo" / "model")
    if quantize:
        qm = json.loads((runs / "quantize" / "manifest.json").read_text())
        assert qm["inputs"]["model"] == str(runs / "dpo")
        assert (runs / "quantize" / "model" / "quantize_config.json").exists()

    grpo = run_pipeline(config, "alignment=grpo")  # rule rewards only: still no RM
    assert grpo.returncode == 0, grpo.stdout[-3000:] + grpo.stderr[-6000:]
    rec = record(tmp_path)
    assert list(rec) == ["sft", "grpo", *(["quantize"] if quantize else [])]
    assert rec["sft"]["status"] == "skipped" and rec["grpo"]["status"] == "ran" and not (runs / "rm").exists()
    gm = json.loads((runs / "grpo" / "manifest.json").read_text())["metrics"]
    assert {"eval_arithmetic_correct_before", "eval_arithmetic_correct_after", "eval_answer_format_after"} <= set(gm)
    if quantize:
        assert rec["quantize"]["status"] == "ran"  # its input changed: quantized again, from the GRPO model
        qm = json.loads((runs / "quantize" / "manifest.json").read_text())
        assert qm["inputs"]["model"] == str(runs / "grpo")


def test_alignment_keeps_rm_only_when_a_stage_needs_it(tmp_path):
    from training import pipeline

    def stage(name: str, body: dict) -> dict:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"checkpoint": {"output_dir": str(tmp_path / name)},
                                                               **body}))
        return {"name": name, "config": str(tmp_path / f"{name}.yaml")}

    base = {"model": {"path": "m"}, "data": {"train": ["p.jsonl"]}}
    rm_reward = {**base, "grpo": {"rewards": [{"model": str(tmp_path / "rm")}, {"function": PROBE}]}}
    ppo = {**base, "ppo": {"reward_model_path": "r"}}
    spec = {"stages": [stage("sft", base), stage("rm", base), stage("ppo", ppo), stage("dpo", base),
                       stage("grpo", rm_reward)]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))

    def names(*over: str) -> list[str]:
        return [s.name for s in pipeline.load_pipeline(tmp_path / "p.yaml", list(over)).stages]

    assert names() == ["sft", "rm", "ppo", "dpo", "grpo"]  # no alignment: every listed stage
    assert names("alignment=ppo") == ["sft", "rm", "ppo"]
    assert names("alignment=dpo") == ["sft", "dpo"]
    assert names("alignment=grpo") == ["sft", "rm", "grpo"]  # a reward term names the RM
    assert names("alignment=grpo", f"grpo:grpo.rewards=[{{function: '{PROBE}'}}]") == ["sft", "grpo"]
    with pytest.raises(ConfigError, match="alignment: Input should be"):
        names("alignment=kto")
    spec["stages"] = spec["stages"][:3]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="alignment: grpo is not one of the stages"):
        names("alignment=grpo")


def test_dpo_under_torchrun_scores_the_reference_once_across_ranks(tiny_model, tmp_path):
    from training.dpo import REFERENCE_FILE

    one, two = tmp_path / "one", tmp_path / "two"
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, one), "train.max_steps=1")
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, two), "train.max_steps=2", "train.micro_batch_size=4",
              nproc=2)
    a, b = (torch.load(d / REFERENCE_FILE, weights_only=True) for d in (one, two))
    assert torch.allclose(a["train"], b["train"], atol=1e-5) and torch.allclose(a["eval"], b["eval"], atol=1e-5)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["metrics"]["eval_pairs"] == 8


def test_dpo_and_grpo_train_lora_adapters_and_export_merged_models(tiny_model, tmp_path):
    lora = ("model.lora.rank=4", "model.lora.alpha=8")
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, tmp_path / "dpo"), "train.max_steps=2", *lora)
    rewards = [{"function": "training.rewards:answer_format"}, {"function": PROBE, "weight": 0.1}]
    run_stage("training.grpo", grpo_config(tiny_model, tmp_path, tmp_path / "grpo", rewards), "train.max_steps=1",
              *lora)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    for name in ("dpo", "grpo"):
        m = json.loads((tmp_path / name / "manifest.json").read_text())["metrics"]
        assert 0 < m["trainable_parameters"] < m["parameters"] / 10, (name, m)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model")
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                               base.model.layers[0].self_attn.q_proj.weight), name


def test_shipped_dpo_and_grpo_configs_validate():
    from conftest import ROOT

    from training import pipeline
    from training.config import DPOConfig

    configs = ROOT / "training" / "configs"
    for path in sorted(configs.rglob("*.yaml")):
        cls = DPOConfig if path.stem == "dpo" else GRPOConfig if path.stem.startswith("grpo") else None
        if cls is not None:
            cfg = load_config(cls, path)
            assert cfg.checkpoint.output_dir.endswith(path.stem), path
    quality = pipeline.load_pipeline(configs / "quality-gpu" / "pipeline.yaml")
    assert [s.name for s in quality.stages] == ["rm", "ppo", "dpo", "grpo", "grpo_rule"]  # no alignment: all run
    assert pipeline.stage_output_dir(quality.stages[-1]) == Path("runs/quality-gpu/grpo_rule")
    demo = [s.name for s in pipeline.load_pipeline(configs / "demo" / "pipeline.yaml", ["alignment=dpo"]).stages]
    assert demo == ["sft", "dpo", "quantize"]


def test_dpo_counts_only_reply_tokens_in_every_pair_format(tiny_model):
    from transformers import AutoTokenizer

    from training.data import collate_dpo, parse_preference, tokenize_preference

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [  # ColossalChat, Anthropic HH transcripts, OpenAI messages + chosen/rejected
        {"context": [{"from": "human", "content": "Say hello."}],
         "chosen": [{"from": "assistant", "content": "Hello!"}], "rejected": [{"from": "assistant", "content": "No."}]},
        {"chosen": "\n\nHuman: Say hello.\n\nAssistant: Hello!", "rejected": "\n\nHuman: Say hello.\n\nAssistant: No."},
        {"messages": [{"role": "user", "content": "Say hello."}], "chosen": "Hello!", "rejected": "No."},
    ]
    batch = collate_dpo([tokenize_preference(parse_preference(r), tok, 64) for r in rows], pad_id=tok.pad_token_id)
    for side, reply in (("chosen", "Hello!"), ("rejected", "No.")):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"]
        assert torch.equal(ids[0], ids[1]) and torch.equal(ids[1], ids[2])  # one rendering for the three formats
        for b in range(3):
            text = tok.decode(ids[b][mask[b].bool()])
            assert text.startswith(reply) and "Say hello" not in text and "user" not in text, text
            assert mask[b].sum() < batch[f"{side}_attention_mask"][b].sum()


def test_validation_fraction_tunes_on_training_rows_and_never_reads_the_held_out_ones(tmp_path):
    from training import runner
    from training.config import DataConfig

    rows = [{"prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(train=[str(data)], eval_fraction=0.2)
    plain = runner.load_data(cfg, "preference", seed=42)
    train, test = plain.train, plain.held
    tuned = runner.load_data(cfg.model_copy(update={"validation_fraction": 0.25}), "preference", seed=42)
    tune_train, val, report = tuned.train, tuned.held, tuned.report
    key = [str(p) for p in test]
    assert len(test) == 8 and len(val) == 8 and len(tune_train) == 24
    assert not {str(p) for p in val + tune_train} & set(key)  # the test pairs are in neither part
    assert {str(p) for p in val + tune_train} == {str(p) for p in train}  # the validation rows come from train
    assert [str(p) for p in tuned.test] == key and plain.test == []  # kept, to be scored once at the end
    assert report["validation_rows"] == 8 and report["test_rows"] == 8 and "eval_rows" not in report


def test_ppo_and_grpo_report_the_same_held_out_before_for_the_same_model_and_prompts(tiny_model, reward_model):
    """One evaluation (training/heldout.py): PPO's RM reward and GRPO's with that RM as its only reward agree on the
    same policy and prompts, although their rollout sizes differ (3 rollouts vs 2 prompts x G=4)."""
    from training import ppo
    from training.config import PPOConfig
    from training.data import eos_token_ids, parse_prompt, tokenize_prompt
    from training.grpo import evaluate_rewards, load_rewards
    from training.models import load_policy, load_tokenizer

    common = {"model": {"path": str(tiny_model)}, "data": {"train": ["unused.jsonl"], "max_length": 64},
              "train": {"device": "cpu", "precision": "fp32"}, "checkpoint": {"output_dir": "unused"}}
    gen = {"max_new_tokens": 6, "temperature": 1.0}
    pcfg = PPOConfig.model_validate({**common, "ppo": {"reward_model_path": str(reward_model),
                                                       "rollout_batch_size": 3, "generation": gen}})
    gcfg = GRPOConfig.model_validate({**common, "grpo": {"rewards": [{"model": str(reward_model)}], "group_size": 4,
                                                         "rollout_batch_size": 2, "generation": gen}})
    tok = load_tokenizer(pcfg.model)
    rows = [parse_prompt({"prompt": q}) for q in QUESTIONS[:5]]
    ids = [tokenize_prompt(r, tok, 64) for r in rows]
    device = torch.device("cpu")
    actor = load_policy(pcfg.model, trainable=False).eval()
    terms = load_rewards(gcfg, device, tok.pad_token_id)
    eos = eos_token_ids(tok)
    got_ppo = ppo.evaluate_reward(actor, terms[0].model, ids, pcfg, eos, tok.pad_token_id, device, tokenizer=tok)
    got_grpo = evaluate_rewards(actor, terms, list(zip(ids, rows, strict=True)), gcfg, tok, eos, device)
    assert got_ppo["prompts"] == got_grpo["prompts"] == 5
    assert got_ppo["reward"] == pytest.approx(got_grpo["reward"], abs=1e-6)
    assert got_ppo["response_length"] == got_grpo["response_length"] > 0
    assert got_ppo["reward"] != 0.0  # a real score, not an empty mean


# ----------------------------------------------------------------------------- checkpoint.keep_best

def rescore_dpo(cfg_path: Path, overrides: list[str], model_dir: Path, reference: Path) -> dict[str, float]:
    """The stage's validation pairs scored afresh: ``model_dir`` against a live reference."""
    from transformers import AutoModelForCausalLM

    from training import dpo, runner
    from training.config import DPOConfig
    from training.data import collate_dpo, tokenize_preference
    from training.models import load_tokenizer

    cfg = load_config(DPOConfig, cfg_path, overrides)
    tok = load_tokenizer(cfg.model)
    rows = runner.load_data(cfg.data, "preference", cfg.train.seed).held
    held = [t for t in (tokenize_preference(r, tokenizer=tok, max_length=cfg.data.max_length) for r in rows) if t]
    model, ref = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (model_dir, reference))
    with torch.no_grad():
        return dpo.eval_summary(dpo.eval_batch(model, collate_dpo(held, pad_id=tok.pad_token_id), ref=ref, cfg=cfg))


def test_keep_best_ends_with_the_best_validation_model_and_scores_the_test_pairs_once(tiny_model, tmp_path):
    out = tmp_path / "dpo"
    cfg = dpo_config(tiny_model, tmp_path, out)
    args = ["checkpoint.keep_best=acc", "log.eval_every=2", "train.lr=1e-2", "data.validation_fraction=0.25"]
    run_stage("training.dpo", cfg, *args)

    m = json.loads((out / "manifest.json").read_text())["metrics"]
    evals = read_metrics(out, split="eval")
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]
    top = max(r["acc"] for r in evals)
    first = next(r for r in evals if r["acc"] == top)  # ties keep the earlier
    assert m["best_step"] == first["step"] < 10 and m["best_metric"] == "acc", (m, evals)
    assert m["eval_acc"] == top and m["eval_margin"] == pytest.approx(first["margin"])
    assert m["last_eval_margin"] == pytest.approx(evals[-1]["margin"]) != pytest.approx(first["margin"])
    # model/ is the best step's weights, not the last step's: scored afresh it gives the best evaluation
    again = rescore_dpo(cfg, args, out / "model", tiny_model)
    assert again["margin"] == pytest.approx(first["margin"], rel=1e-4, abs=1e-5)
    # the eval rows became the test pairs: scored once, by that model, after the choice
    assert m["test_pairs"] == 8 and m["eval_pairs"] == 4 and "test_acc" in m
    assert [r["step"] for r in read_metrics(out, split="test")] == [10]
    assert not list(out.glob("best-step-*")) and not (out / "best.json").exists()


def test_keep_best_resumes_after_a_crash_past_and_before_its_export(tiny_model, tmp_path):
    """Margin rises every evaluation here, so a new best is exported at every one (steps 2, 4, 6, ...): a crash after
    step 7 leaves best.json at step 6 and the checkpoint at 4; the resume drops that best and redoes it."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("checkpoint.keep_best=margin", "log.eval_every=2", "train.lr=1e-2", "data.validation_fraction=0.25",
            "checkpoint.save_every=4")
    run_stage("training.dpo", dpo_config(tiny_model, tmp_path, straight), *args)
    cfg = dpo_config(tiny_model, tmp_path, killed)
    proc = run_stage("training.dpo", cfg, *args, env={"TRAINING_CRASH_AFTER_STEP": "7"}, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert json.loads((killed / "best.json").read_text())["step"] == 6 and (killed / "best-step-000006").is_dir()
    run_stage("training.dpo", cfg, *args, "--resume")

    want, got = (json.loads((o / "manifest.json").read_text())["metrics"] for o in (straight, killed))
    assert got["best_step"] == want["best_step"] == 10
    for key in ("eval_margin", "eval_acc", "test_margin", "test_acc"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("override, stage, named", [
    (["checkpoint.keep_best=perplexity", "log.eval_every=2"], "training.dpo", "reports no held-out metric"),
    (["checkpoint.keep_best=acc"], "training.dpo", "needs log.eval_every"),
    (["checkpoint.keep_best=acc", "log.eval_every=2", "model.lora.rank=4"], "training.dpo", "model.lora"),
])
def test_keep_best_config_errors_name_the_field(tiny_model, tmp_path, override, stage, named):
    proc = run_stage(stage, dpo_config(tiny_model, tmp_path, tmp_path / "dpo"), *override, check=False)
    assert proc.returncode == 2 and "checkpoint.keep_best" in proc.stderr and named in proc.stderr, proc.stderr[-1500:]


def test_label_smoothing_with_ipo_is_a_config_error_naming_the_field(tiny_model, tmp_path):
    from training.config import DPOConfig

    cfg = dpo_config(tiny_model, tmp_path, tmp_path / "dpo")
    with pytest.raises(ConfigError, match="dpo.label_smoothing is for dpo.loss: sigmoid"):
        load_config(DPOConfig, cfg, ["dpo.loss=ipo", "dpo.label_smoothing=0.1"])
    assert load_config(DPOConfig, cfg, ["dpo.label_smoothing=0.1"]).dpo.label_smoothing == 0.1
