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

from training.config import ConfigError, GRPOConfig, load_config
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
