"""training.artifacts: the one place that reads a stage folder (manifest, its model, its latest checkpoint)."""

from __future__ import annotations

import json
import sys

import pytest

from training.artifacts import atomic_write_json, latest_checkpoint, model_folder, read_manifest, stage_model
from training.config import ConfigError


def test_stage_folder_lookups(tmp_path):
    stage = tmp_path / "dpo"
    assert read_manifest(stage) is None and latest_checkpoint(stage) is None
    (stage / "checkpoints" / "step-000004").mkdir(parents=True)
    (stage / "checkpoints" / "latest").write_text("step-000004\n")
    assert latest_checkpoint(stage) is None  # no state.json: a half-written checkpoint is not offered
    (stage / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    assert latest_checkpoint(stage) == stage / "checkpoints" / "step-000004"

    (stage / "model").mkdir()
    (stage / "model" / "config.json").write_text("{}")
    atomic_write_json(stage / "manifest.json", {"outputs": {"model": "model"}})  # relative: inside the stage folder
    assert read_manifest(stage)["outputs"] == {"model": "model"}
    assert stage_model(stage) == stage / "model" and model_folder(stage) == stage / "model"
    assert model_folder(stage / "model") == stage / "model"
    (stage / "manifest.json").write_text(json.dumps({"outputs": {}}))
    with pytest.raises(ConfigError, match="model.path: .*names no outputs.model"):
        stage_model(stage, "model.path")
    with pytest.raises(ConfigError, match="not a model folder"):
        model_folder(tmp_path)


def test_reading_a_stage_folder_imports_no_torch():
    import subprocess

    code = ("import sys, training.artifacts, training.pipeline, serving.config; "
            "print(sorted(m for m in ('torch', 'training.checkpoint', 'training.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
