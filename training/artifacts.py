"""A stage folder's files, written and read in one place: its manifest, the model it produced, its latest
checkpoint.

The pipeline (what to skip or resume), the model loader (``model.path`` naming a stage folder), the quantize stage
and serving (``--model runs/ppo``) all ask these questions; they ask here. Standard library only, so the pipeline
and serving read a stage folder without importing torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training.config import ConfigError

MANIFEST = "manifest.json"  # written last: the stage is complete when it exists
STATE = "state.json"  # inside a checkpoint: written last, so a checkpoint with it is whole
LATEST = "latest"  # checkpoints/latest names the newest complete checkpoint


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a stage folder, or None."""
    pointer = Path(output_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


def is_stage_folder(path: str | Path) -> bool:
    """A stage's output folder (a manifest, and no model of its own at the top)."""
    p = Path(path)
    return (p / MANIFEST).is_file() and not (p / "config.json").is_file()


def stage_model(stage_dir: str | Path, field: str = "model") -> Path:
    """The model a completed stage produced (``outputs.model`` of its manifest); a relative path is taken relative
    to the stage folder when it exists there. ``field`` names the config key in the error."""
    stage_dir = Path(stage_dir)
    model = ((read_manifest(stage_dir) or {}).get("outputs") or {}).get("model")
    if not model:
        raise ConfigError(f"{field}: {stage_dir / MANIFEST} names no outputs.model")
    mp = Path(model)
    return mp if mp.is_absolute() or not (stage_dir / mp).exists() else stage_dir / mp


def model_folder(path: str | Path, field: str = "model") -> Path:
    """A Hugging Face model folder as given, or the model a stage folder's manifest names."""
    p = Path(path)
    if is_stage_folder(p):
        return stage_model(p, field)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{field}: {p} is not a model folder (no config.json) nor a stage output "
                          "(no manifest.json)")
    return p
