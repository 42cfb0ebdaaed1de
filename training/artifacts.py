"""A stage folder's files, written and read in one place: its manifest, the model it produced, its latest
checkpoint.

The pipeline (what to skip or resume), the model loader (``model.path`` naming a stage folder), the quantize stage
and serving (``--model runs/ppo``) all ask these questions; they ask here. Standard library only, so the pipeline
and serving read a stage folder without importing torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from training.config import ConfigError

MANIFEST = "manifest.json"  # written last: the stage is complete when it exists
STATE = "state.json"  # inside a checkpoint: written last, so a checkpoint with it is whole
LATEST = "latest"  # checkpoints/latest names the newest complete checkpoint


# The stages' exit code for a full disk: ENOSPC's errno, distinct from 2 (bad config or data) and from a crash (1),
# so a pipeline or a Job's podFailurePolicy can stop instead of retrying into the same full volume.
DISK_FULL_EXIT = 28
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How writers that keep the OS text say it (safetensors' Rust writer: "os error 28").
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")
# torch's zip writer drops the errno ("file write failed", or "unexpected pos 473984 vs 473936" on a full 2.5 MiB
# tmpfs), so a failed write with less than this left on the filesystem counts as a full disk too.
_LOW_SPACE_BYTES = 64 << 20


class DiskFullError(Exception):
    """A write under ``path`` failed because its filesystem is full; nothing half-written was left in place."""

    def __init__(self, path: Path, cause: BaseException):
        self.path = path
        super().__init__(f"no space left on device while writing {path} ({type(cause).__name__}: "
                         f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else cause!r}); partial "
                         "files were removed and the previous checkpoint (if any) is still `latest`: free space and "
                         "rerun with --resume")


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def is_disk_full(e: BaseException, path: Path | None = None) -> bool:
    """True when ``e`` (or what it wraps) is an out-of-space error, or any write error while ``path``'s filesystem
    has almost nothing left (for writers that lose the errno)."""
    if path is not None:
        free = _free_bytes(path)
        if free is not None and free < _LOW_SPACE_BYTES:
            return True
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(cur).lower() for t in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _remove(tmp)
        if is_disk_full(e, path):
            raise DiskFullError(path, e) from e
        raise
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
