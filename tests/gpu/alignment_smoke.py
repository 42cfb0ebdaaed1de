"""CPU smoke check of the GPU alignment quality run: training/configs/quality-gpu/ with a tiny random Llama, a few
rows and steps, through the pipeline and tests/gpu/alignment_table.py. Mechanics only: the numbers mean nothing.

    python tests/gpu/alignment_smoke.py [WORK_DIR]        (default /tmp/alignment-smoke; about 3 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
QUALITY = ROOT / "training" / "configs" / "quality-gpu"
DEMO = ROOT / "training" / "demo_data"
SMALL = {  # per stage: overrides that shrink the quality configs to seconds
    "rm": {"data.max_samples": 24, "data.max_length": 96, "train.epochs": 1, "train.micro_batch_size": 4},
    # DPO as the GPU run's stage runs it: chosen on a validation cut, its best evaluation kept, the pairs the RM
    # is scored on scored once at the end (test_* in its manifest, what the table reads)
    "dpo": {"data.max_samples": 24, "data.max_length": 96, "train.epochs": 1, "train.micro_batch_size": 4,
            "data.validation_fraction": 0.25, "checkpoint.keep_best": "acc", "log.eval_every": 2},
    "ppo": {"data.max_samples": 48, "data.max_length": 64, "train.max_steps": 2, "train.micro_batch_size": 4,
            "ppo.rollout_batch_size": 4, "ppo.generation.max_new_tokens": 8},
    "grpo": {"data.max_samples": 48, "data.max_length": 64, "train.max_steps": 2, "train.micro_batch_size": 4,
             "grpo.rollout_batch_size": 2, "grpo.generation.max_new_tokens": 8},
    "grpo_rule": {"data.max_samples": 16, "train.max_steps": 2, "train.micro_batch_size": 8,
                  "grpo.rollout_batch_size": 2, "grpo.group_size": 4, "grpo.generation.max_new_tokens": 8},
}


def set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/alignment-smoke")
    for stale in ("runs", "out"):  # a finished stage from an older checkout would be skipped, not rerun
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not (model / "config.json").exists():
        make_tiny_llama(model)
    runs = work / "runs"
    pipe = yaml.safe_load((QUALITY / "pipeline.yaml").read_text())
    pipe.update(run_dir=str(runs), base_model=None)
    hh = str(DEMO / "preference_hh.jsonl")  # HH transcripts, like the shared HH file
    for stage in pipe["stages"]:
        cfg = yaml.safe_load((ROOT / stage["config"]).read_text())
        name = stage["name"]
        cfg["model"]["path"] = str(model)
        cfg["checkpoint"]["output_dir"] = str(runs / name)
        cfg["train"]["device"] = "cpu"
        cfg["log"].update(progress=False, tensorboard=False)
        if name != "grpo_rule":
            cfg["data"]["train"] = [hh]
            cfg["data"]["eval_fraction"] = 0.25
        for k, v in SMALL[name].items():
            set_dotted(cfg, k, v)
        for r in cfg.get("grpo", {}).get("rewards", []):
            if "model" in r:
                r["model"] = str(runs / "rm")
        if "ppo" in cfg:
            cfg["ppo"]["reward_model_path"] = str(runs / "rm")
            cfg["ppo"]["ptx_data"] = [str(DEMO / "sft_en.jsonl")]
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        stage["config"] = str(path)
    (work / "pipeline.yaml").write_text(yaml.safe_dump(pipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(work / "out")}
    subprocess.run([sys.executable, "-m", "training.pipeline", "--config", str(work / "pipeline.yaml")], cwd=ROOT,
                   env=env, check=True)
    subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "alignment_table.py"), "--pipeline",
                    str(work / "pipeline.yaml")], cwd=ROOT, env=env, check=True)
    table = json.loads((work / "out" / "alignment_table.json").read_text())
    missing = {"dpo_vs_rm", "ppo_vs_grpo", "grpo_rule"} - set(table)
    if missing:
        raise SystemExit(f"table lacks {sorted(missing)}")
    for name in ("ppo", "grpo"):
        row = table["ppo_vs_grpo"][name]
        if not all(row.get(k) is not None for k in ("reward_after", "win_rate_vs_sft", "kl_to_reference", "wall_s")):
            raise SystemExit(f"incomplete {name} row: {row}")
    print("smoke ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
