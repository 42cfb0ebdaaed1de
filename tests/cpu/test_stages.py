"""SFT, RM and PPO end to end through their CLIs on a tiny random Llama, ColossalAI ddp plugin, CPU."""

from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_stage, write_jsonl

from training.metrics import read_metrics

SFT_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"instruction": "Add two and two.", "input": "", "output": "Two plus two is four."},
    {"messages": [{"from": "human", "content": "你好"}, {"from": "assistant", "content": "你好，今天天气很好。"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem."},
                  {"role": "assistant", "content": "The sea is wide and blue."}]},
]

GOOD = ["The capital of France is Paris.", "Two plus two is four.", "The sea is wide and blue.",
        "Tokyo is the capital of Japan."]
BAD = ["no no no no no no", "xx yy zz xx yy zz", "?? ?? ?? ?? ??", "!!!! !!!! !!!!"]
QUESTIONS = ["Tell me a fact.", "Say something true.", "What do you know?", "Answer me.", "Any fact?",
             "Share one thing.", "What is true?", "Give me an answer."]


def preference_rows(offset: int = 0) -> list[dict]:
    """A separable toy set: chosen answers are fluent sentences, rejected ones are noise."""
    rows = []
    for i, q in enumerate(QUESTIONS):
        rows.append({"context": [{"from": "human", "content": q}],
                     "chosen": [{"from": "assistant", "content": GOOD[(i + offset) % 4]}],
                     "rejected": [{"from": "assistant", "content": BAD[(i + offset) % 4]}]})
    return rows


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def base_config(model: Path, data: list[str], out: Path, **train) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"train": data, "max_length": 64, "shuffle": False},
        "train": {"plugin": "ddp", "micro_batch_size": 4, "max_steps": 6, "lr": 1e-3, "warmup_steps": 0,
                  "min_lr_ratio": 1.0, **train},
        "checkpoint": {"output_dir": str(out)},
        "log": {"every": 1, "tensorboard": True, "progress": False},
    }


def losses_by_step(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out)}


def test_sft_loss_falls_and_exports_a_loadable_model(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    out = tmp_path / "sft"
    cfg = write_config(tmp_path / "sft.yaml", base_config(tiny_model, [str(data)], out, max_steps=8, lr=5e-3))
    run_stage("training.sft", cfg)

    loss = losses_by_step(out)
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < 0.7 * loss[1], loss  # one repeated batch: the model memorises it
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["status"] == "complete"
    assert manifest["inputs"]["train_rows"] == 4
    assert manifest["metrics"]["final_loss"] == pytest.approx(loss[8], rel=1e-4)
    assert {"tokens_per_s", "grad_norm", "lr", "peak_mem_gib"} <= set(read_metrics(out)[0])
    assert list((out / "tensorboard").iterdir())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template and (out / "model" / "model.safetensors").exists()
    before = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)


def test_rm_accuracy_rises_above_chance_on_separable_pairs(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_rows() * 2)
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(offset=1))
    out = tmp_path / "rm"
    cfg = base_config(tiny_model, [str(train)], out, max_steps=12, micro_batch_size=8)
    cfg["data"]["eval"] = [str(held)]
    run_stage("training.rm", write_config(tmp_path / "rm.yaml", cfg))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["eval_pairs"] == 8
    assert manifest["metrics"]["eval_acc"] >= 0.875, manifest["metrics"]
    assert manifest["metrics"]["eval_margin"] > 0
    from transformers import AutoModelForTokenClassification

    rm = AutoModelForTokenClassification.from_pretrained(out / "model")
    assert rm.config.num_labels == 1


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory) -> Path:
    """A reward model folder (random head) made the way the RM stage starts one."""
    from training.config import ModelConfig
    from training.models import load_value_model

    out = tmp_path_factory.mktemp("rm") / "model"
    model = load_value_model(ModelConfig(path=str(tiny_model)))
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def ppo_config(tiny_model: Path, reward_model: Path, tmp_path: Path, out: Path, **train) -> Path:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": q} for q in QUESTIONS])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": q} for q in ("Name a color.", "Count to two.",
                                                                                 "Say hello.")])
    ptx = write_jsonl(tmp_path / "ptx.jsonl", SFT_ROWS)
    cfg = base_config(tiny_model, [str(prompts)], out, max_steps=3, micro_batch_size=2, lr=1e-3, **train)
    cfg["data"]["eval"] = [str(held_out)]
    cfg["ppo"] = {"reward_model_path": str(reward_model), "ptx_data": [str(ptx)], "ptx_coef": 0.5,
                  "rollout_batch_size": 4, "ppo_epochs": 2, "kl_coef": 0.1,
                  "generation": {"max_new_tokens": 8, "temperature": 1.0, "top_k": 20}}
    return write_config(tmp_path / f"{out.name}.yaml", cfg)


def test_ppo_changes_policy_with_zero_initial_kl(tiny_model, reward_model, tmp_path):
    out = tmp_path / "ppo"
    run_stage("training.ppo", ppo_config(tiny_model, reward_model, tmp_path, out))

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["kl"]) < 1e-5  # actor == reference before the first update
    assert any(abs(r["kl"]) > 1e-4 for r in rows[1:])
    for key in ("reward", "policy_loss", "value_loss", "ptx_loss", "clip_frac", "entropy", "response_length"):
        assert all(key in r for r in rows), key
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    actor = AutoModelForCausalLM.from_pretrained(out / "actor")
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(actor.lm_head.weight, start.lm_head.weight)
    critic = AutoModelForTokenClassification.from_pretrained(out / "critic")
    assert not torch.equal(critic.score.weight,
                           AutoModelForTokenClassification.from_pretrained(reward_model).score.weight)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["actor"].endswith("actor") and manifest["inputs"]["ptx_rows"] == 4
    evals = read_metrics(out, "eval")  # greedy answers to held-out prompts, scored by the RM, before and after
    assert [r["step"] for r in evals] == [0, 3] and all(r["prompts"] == 3 for r in evals)
    assert manifest["metrics"]["eval_reward_before"] == pytest.approx(evals[0]["reward"], abs=1e-5)
    assert manifest["metrics"]["eval_reward_after"] == pytest.approx(evals[1]["reward"], abs=1e-5)
    assert evals[0]["reward"] != evals[1]["reward"]  # the policy moved


def test_sft_kill_and_resume_matches_uninterrupted_run(tiny_model, tmp_path):
    rows = SFT_ROWS * 3  # 12 rows, 3 batches an epoch: resume crosses an epoch boundary
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    ref_out, out = tmp_path / "straight", tmp_path / "killed"
    extra = {"max_steps": 6, "lr": 3e-4}
    straight = base_config(tiny_model, [str(data)], ref_out, **extra)
    straight["data"]["shuffle"] = True
    run_stage("training.sft", write_config(tmp_path / "a.yaml", straight))

    killed = {**straight, "checkpoint": {"output_dir": str(out), "save_every": 2}}
    cfg = write_config(tmp_path / "b.yaml", killed)
    proc = run_stage("training.sft", cfg, env={"TRAINING_CRASH_AFTER_STEP": "5"}, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    run_stage("training.sft", cfg, "--resume")

    assert losses_by_step(out) == pytest.approx(losses_by_step(ref_out), rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000004", "step-000006"]


def test_lora_with_gradient_checkpointing_resumes_and_exports_merged_model(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 2)
    cfg = base_config(tiny_model, [str(data)], tmp_path / "straight", max_steps=4, micro_batch_size=2)
    cfg["model"].update(lora={"rank": 4, "alpha": 8}, gradient_checkpointing=True)
    run_stage("training.sft", write_config(tmp_path / "a.yaml", cfg))
    killed = {**cfg, "checkpoint": {"output_dir": str(tmp_path / "killed"), "save_every": 2}}
    proc = run_stage("training.sft", write_config(tmp_path / "b.yaml", killed),
                     env={"TRAINING_CRASH_AFTER_STEP": "3"}, check=False)
    assert proc.returncode == 17
    run_stage("training.sft", tmp_path / "b.yaml", "--resume")
    assert losses_by_step(tmp_path / "killed") == pytest.approx(losses_by_step(tmp_path / "straight"), rel=1e-5)

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model")  # a plain model: LoRA merged
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_merged, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)  # not a LoRA target: untouched
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert 0 < manifest["metrics"]["trainable_parameters"] < manifest["metrics"]["parameters"] / 10


@pytest.mark.parametrize("rollout_engine", ["hf", "serving"])
def test_ppo_kill_and_resume_restores_actor_and_critic(tiny_model, reward_model, tmp_path, rollout_engine):
    ref_out, out = tmp_path / "straight", tmp_path / "killed"
    engine = f"ppo.rollout_engine={rollout_engine}"
    run_stage("training.ppo", ppo_config(tiny_model, reward_model, tmp_path, ref_out), engine)
    cfg_path = ppo_config(tiny_model, reward_model, tmp_path, out)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["checkpoint"]["save_every"] = 1
    write_config(cfg_path, cfg)
    proc = run_stage("training.ppo", cfg_path, engine, env={"TRAINING_CRASH_AFTER_STEP": "2"}, check=False)
    assert proc.returncode == 17
    ckpt = out / "checkpoints" / "step-000001"
    assert {"actor", "critic", "actor.optim", "critic.optim", "actor.sched", "critic.sched"} <= {
        p.name for p in ckpt.iterdir()}
    run_stage("training.ppo", cfg_path, "--resume", engine)
    for key in ("reward", "kl", "policy_loss", "value_loss", "ptx_loss"):
        assert losses_by_step(out, key) == pytest.approx(losses_by_step(ref_out, key), rel=1e-4, abs=1e-6), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["rollout"]["engine"] == rollout_engine
    assert all(r["rollout_s"] > 0 and r["update_s"] > 0 for r in read_metrics(out))


def test_sft_and_ppo_under_torchrun_with_two_ranks(tiny_model, reward_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 4)
    out = tmp_path / "sft2"
    cfg = base_config(tiny_model, [str(data)], out, max_steps=3, micro_batch_size=2)
    cfg["checkpoint"]["save_every"] = 2
    run_stage("training.sft", write_config(tmp_path / "sft2.yaml", cfg), nproc=2)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert (out / "checkpoints" / "step-000002" / "rng" / "rank-1.pt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and (out / "model" / "config.json").exists()
    # a checkpoint from 2 ranks does not silently resume on 1
    proc = run_stage("training.sft", write_config(tmp_path / "sft1.yaml", {**cfg, "train": {**cfg["train"],
                     "max_steps": 4}}), "--resume", check=False)
    assert proc.returncode == 2 and "world size" in proc.stderr

    ppo_out = tmp_path / "ppo2"
    run_stage("training.ppo", ppo_config(tiny_model, reward_model, tmp_path, ppo_out), "train.max_steps=1", nproc=2)
    assert [r["step"] for r in read_metrics(ppo_out)] == [1]
    assert (ppo_out / "actor" / "config.json").exists() and (ppo_out / "critic" / "config.json").exists()


def test_bad_config_and_bad_row_give_clear_errors(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS + [{"messages": [{"role": "user", "content": 3}]}])
    cfg = base_config(tiny_model, [str(data)], tmp_path / "out")
    proc = run_stage("training.sft", write_config(tmp_path / "c.yaml", cfg), check=False)
    assert proc.returncode == 2
    assert "sft.jsonl" in proc.stderr and "line 5" in proc.stderr and "content" in proc.stderr

    proc = run_stage("training.sft", write_config(tmp_path / "d.yaml", cfg), "train.plugin=gemini", check=False)
    assert proc.returncode == 2 and "needs CUDA" in proc.stderr

    proc = run_stage("training.sft", write_config(tmp_path / "e.yaml", cfg), "train.learning_rate=1", check=False)
    assert proc.returncode == 2 and "train.learning_rate" in proc.stderr

    raw = gzip.compress(data.read_bytes() * 40)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(raw[: len(raw) // 2])  # a copy cut off half-way
    bad_gz = {**cfg, "data": {**cfg["data"], "train": [str(cut)]}}
    proc = run_stage("training.sft", write_config(tmp_path / "g.yaml", bad_gz), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " + str(cut) + ": compressed data is truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr

    cfg["data"]["on_error"] = "skip"
    cfg["train"]["max_steps"] = 1
    run_stage("training.sft", write_config(tmp_path / "f.yaml", cfg))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["train_skipped"] == 1 and manifest["inputs"]["train_rows"] == 4


def test_sft_loss_is_next_token_cross_entropy_on_labelled_tokens_only():
    from training.losses import IGNORE_INDEX, sft_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = IGNORE_INDEX  # a prompt: no loss on it
    labels[1, 4:] = IGNORE_INDEX  # padding
    loss, n = sft_loss(logits, labels)
    pairs = [(b, t) for b in range(2) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX]
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[b, t], labels[b, t + 1]) for b, t in pairs])
    assert int(n) == len(pairs) == 6
    assert torch.allclose(loss, expected.mean())
    all_ignored, none = sft_loss(logits, torch.full_like(labels, IGNORE_INDEX))
    assert int(none) == 0 and float(all_ignored) == 0.0


def test_ppo_right_packing_keeps_the_left_padded_logprobs(tiny_model):
    from transformers import AutoModelForCausalLM

    from training.models import position_ids
    from training.ppo import pack_right, response_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    P, R, pad = 5, 4, 0
    seq = torch.randint(3, model.config.vocab_size, (3, P + R))
    mask = torch.ones_like(seq)
    mask[0, :2] = 0  # two prompt pads on the left
    mask[1, :4] = 0
    mask[2, P + 2:] = 0  # the response stopped at its second token
    seq = seq.masked_fill(mask == 0, pad)
    packed, packed_mask, start = pack_right(seq, mask, P)

    assert start.tolist() == [3, 1, 5]
    assert not packed_mask[:, :1].eq(0).any()  # no row begins with padding: every query sees a key
    for b in range(3):  # real tokens keep their order; the prompt's padding moved behind the response
        assert packed[b][packed_mask[b].bool()].tolist() == seq[b][mask[b].bool()].tolist()
        assert packed[b, start[b]:start[b] + R].tolist() == seq[b, P:].tolist()
    with torch.no_grad():
        logp, _ = response_logprobs(model, packed, packed_mask, start, R)
        logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits[:, P - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)
    live = mask[:, P:].bool()
    assert torch.allclose(logp[live], expected[live], atol=1e-5)


def test_ppo_actor_loss_in_two_passes_equals_one_padded_batch(tiny_model):
    """The rollout rows and the (longer) PTX rows at their own widths give the one padded batch's loss and
    gradients: the padding was only compute."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from training.data import IGNORE_INDEX
    from training.ppo import actor_loss, pack_right

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    P, R, V = 4, 3, model.config.vocab_size
    seq = torch.randint(3, V, (2, P + R))
    mask = torch.ones_like(seq)
    mask[1, :2] = 0
    seq = seq.masked_fill(mask == 0, 0)
    packed, packed_mask, start = pack_right(seq, mask, P)
    mb = {"seq": packed, "mask": packed_mask, "start": start, "action_mask": torch.ones(2, R),
          "logprobs": -torch.rand(2, R) - 2.0, "advantages": torch.randn(2, R)}
    ids = torch.randint(3, V, (2, 16))  # PTX rows twice the rollout's width, one with right padding
    ptx_mask = torch.ones_like(ids)
    ptx_mask[0, 11:] = 0
    labels = ids.masked_fill(ptx_mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    ptx = {"input_ids": ids.masked_fill(ptx_mask == 0, 0), "attention_mask": ptx_mask, "labels": labels}
    cfg = SimpleNamespace(ppo=SimpleNamespace(clip_eps=0.2, ptx_coef=0.5))

    results = []
    for one_pass in (True, False):
        model.zero_grad()
        loss, stats = actor_loss(model, mb, ptx, cfg, 0, one_pass=one_pass)
        loss.backward()
        results.append((loss.item(), stats, [p.grad.clone() for p in model.parameters()]))
    (l1, s1, g1), (l2, s2, g2) = results
    assert l2 == pytest.approx(l1, rel=1e-5) and s2["ptx_loss"] == pytest.approx(s1["ptx_loss"], rel=1e-5)
    assert s2["policy_loss"] == pytest.approx(s1["policy_loss"], rel=1e-5, abs=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2, strict=True))
    assert s1["ptx_loss"] > 0 and any(a.abs().sum() > 0 for a in g1)


def test_policy_loss_ignores_overflowing_ratios_on_padding():
    from training.losses import policy_loss

    logprobs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -200.0]])  # a padding position whose log-ratio would overflow exp
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_frac = policy_loss(logprobs, old, torch.tensor([[1.0, -1.0, 0.0]]), mask, clip_eps=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert float(loss.detach()) == pytest.approx(-(torch.exp(torch.tensor(0.1)) - 1.0).item() / 2, abs=1e-6)
    assert float(clip_frac) == 0.0


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_at_a_checkpoint_on_a_real_tiny_tmpfs_exits_28_and_keeps_latest(tiny_model, tmp_path):
    """A real full filesystem (a 2.5 MiB tmpfs; one checkpoint of the tiny model is 1.6 MB): the second
    checkpoint cannot fit. Needs root to mount; skipped elsewhere (the monkeypatched test below still runs)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2560k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 3)
        cfg = base_config(tiny_model, [str(data)], disk / "out", max_steps=6)
        cfg["checkpoint"]["save_every"] = 2
        proc = run_stage("training.sft", write_config(tmp_path / "c.yaml", cfg), check=False)
        assert proc.returncode == 28, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: no space left on device while writing " + str(disk / "out" / "checkpoints"))
        assert "Traceback" not in proc.stderr
        ck = disk / "out" / "checkpoints"
        assert (ck / "latest").read_text().strip() == "step-000002"
        assert not list(ck.glob(".tmp-*")) and not list(ck.glob(".latest.tmp-*"))
        assert (ck / "step-000002" / "state.json").is_file() and not (disk / "out" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_checkpoint_write_hitting_enospc_monkeypatched_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """ENOSPC simulated by a monkeypatched writer (no real full disk): the half-written folder is removed, `latest`
    still names the previous checkpoint, and the error names the path; other write errors pass through unchanged."""
    from training import checkpoint as ck_mod

    ck = ck_mod.Checkpointer(tmp_path / "out")
    monkeypatch.setattr(ck_mod.Checkpointer, "_write", staticmethod(lambda tmp, trainables, tok: None))
    ck.save(2, [], None, {"note": "complete"})

    def fills_the_disk(tmp, trainables, tok):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))

    monkeypatch.setattr(ck_mod.Checkpointer, "_write", staticmethod(fills_the_disk))
    with pytest.raises(ck_mod.DiskFullError, match=r"no space left on device while writing .*\.tmp-step-000004"):
        ck.save(4, [], None, {})
    assert ck.latest() == ck.root / "step-000002"
    assert sorted(p.name for p in ck.root.iterdir()) == ["latest", "step-000002"]

    def other_failure(tmp, trainables, tok):  # torch's errno-less text on a disk with room is not a full disk
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(ck_mod.Checkpointer, "_write", staticmethod(other_failure))
    with pytest.raises(RuntimeError, match="file write failed"):
        ck.save(6, [], None, {})

    def enospc_write(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc_write)
    with pytest.raises(ck_mod.DiskFullError, match="manifest.json"):
        ck_mod.atomic_write_json(tmp_path / "out" / "manifest.json", {"x": 1})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoints"]

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        ck_mod.atomic_write_text(tmp_path / uuid.uuid4().hex, "x")


def test_bench_rollout_variants_map_to_ppo_options_and_ptx_pass_is_checked(tmp_path):
    from training.bench import stage_config
    from training.config import PPOConfig

    data = {k: tmp_path / f"{k}.jsonl" for k in ("sft", "pref", "prompts")}
    model = tmp_path / "model"

    def ppo(engine: str, plugin: str = "ddp") -> dict:
        return stage_config("ppo", plugin, model, data, tmp_path / "out", seq=64, batch=2, steps=2,
                            rollout_engine=engine)["ppo"]

    assert ppo("serving")["rollout_engine"] == "serving" and "ptx_pass" not in ppo("serving")
    assert ppo("hf+ptxjoint")["ptx_pass"] == "joint" and ppo("hf+ptxjoint")["rollout_engine"] == "hf"
    both = ppo("serving+compile+overlap+ptxjoint")
    assert both["rollout_compile"] and both["rollout_overlap"] and both["ptx_pass"] == "joint"
    for bad in ("hf+overlap", "serving+fast"):
        with pytest.raises(ValueError, match="--rollout-engines"):
            ppo(bad)
    base = stage_config("ppo", "gemini", model, data, tmp_path / "out", seq=64, batch=2, steps=2)
    base["ppo"]["ptx_pass"] = "separate"
    with pytest.raises(Exception, match="ppo.ptx_pass: separate.*gemini"):
        PPOConfig.model_validate(base)
    base["ppo"]["ptx_pass"] = "joint"
    assert PPOConfig.model_validate(base).ppo.ptx_pass == "joint"
