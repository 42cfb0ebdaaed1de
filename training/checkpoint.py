"""Atomic, resumable checkpoints and the stage manifest.

Layout of a stage's ``output_dir``::

    checkpoints/step-000010/<name>/        model (Hugging Face safetensors + tokenizer), one per trained model
    checkpoints/step-000010/<name>.optim   optimizer state (file for ddp, folder for sharded plugins)
    checkpoints/step-000010/<name>.sched   LR scheduler state
    checkpoints/step-000010/rng/rank-N.pt  every RNG of every rank
    checkpoints/step-000010/state.json     step, sampler positions, last metrics
    checkpoints/latest                     name of the newest complete checkpoint
    <name>/                                the final export, e.g. model/ or actor/ + critic/
    manifest.json                          written last: the stage is complete when it exists

A checkpoint is built in a ``.tmp-`` folder and renamed into place only when every rank
has finished writing, so a killed process never leaves a half checkpoint that looks whole.
A full disk while writing a checkpoint, the export or the manifest raises ``DiskFullError``
(the stages exit with ``DISK_FULL_EXIT`` = 28, ENOSPC's number): the partial files are
removed and ``latest`` keeps naming the previous complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import engine
from training.engine import Trainable

MANIFEST = "manifest.json"
STATE = "state.json"
LATEST = "latest"
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


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(trainable: Trainable, folder: Path, tokenizer: Any) -> None:
    """Write the model as a Hugging Face folder (LoRA: the adapter) on rank 0; collective for sharded plugins."""
    if trainable.cfg.plugin == "ddp":
        if engine.is_main():
            trainable.model.unwrap(unwrap_peft=False).save_pretrained(folder, safe_serialization=True)
    else:
        trainable.booster.save_model(trainable.model, str(folder), shard=True, use_safetensors=True)
    if engine.is_main():
        tokenizer.save_pretrained(folder)


def export_model(trainable: Trainable, folder: Path, tokenizer: Any) -> None:
    """The final model: LoRA merged, a plain Hugging Face folder, written atomically."""
    from training.models import merged_for_export

    tmp = folder.with_name(f".tmp-{folder.name}")
    if engine.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    engine.barrier()
    try:
        if trainable.cfg.plugin == "ddp":
            if engine.is_main():
                merged = merged_for_export(trainable.model.unwrap(unwrap_peft=False))
                merged.save_pretrained(tmp, safe_serialization=True)
        else:
            trainable.booster.save_model(trainable.model, str(tmp), shard=True, use_safetensors=True)
        if engine.is_main():
            tokenizer.save_pretrained(tmp)
    except Exception as e:
        if not is_disk_full(e, tmp):
            raise
        _remove(tmp)
        raise DiskFullError(folder, e) from e
    if engine.is_main():
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    engine.barrier()


class Checkpointer:
    """Saves and restores everything a stage needs to continue at the same step with the same data."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / STATE).exists() else None

    def save(self, step: int, trainables: list[Trainable], tokenizer: Any, state: dict[str, Any]) -> Path:
        name = f"step-{step:06d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if engine.is_main():
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        engine.barrier()
        try:
            self._write(tmp, trainables, tokenizer)
        except Exception as e:
            if not is_disk_full(e, tmp):
                raise
            _remove(tmp)  # frees the space; `latest` was not touched and still names the previous checkpoint
            raise DiskFullError(tmp, e) from e
        engine.barrier()
        if engine.is_main():
            atomic_write_json(tmp / STATE, {"step": step, "time": time.time(), "world_size": engine.world_size(),
                                            **state})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune(keep=final)
        engine.barrier()
        return final

    @staticmethod
    def _write(tmp: Path, trainables: list[Trainable], tokenizer: Any) -> None:
        for t in trainables:
            save_model(t, tmp / t.name, tokenizer)
            optim_path = tmp / f"{t.name}.optim"
            t.booster.save_optimizer(t.optimizer, str(optim_path), shard=t.cfg.plugin != "ddp")
            if engine.is_main():
                t.booster.save_lr_scheduler(t.scheduler, str(tmp / f"{t.name}.sched"))
        torch.save(_rng_state(), tmp / "rng" / f"rank-{engine.rank()}.pt")

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        state = json.loads((path / STATE).read_text())
        if state.get("world_size", 1) != engine.world_size():
            from training.config import ConfigError

            raise ConfigError(f"checkpoint {path} was written with world size {state['world_size']}, this run has "
                              f"world size {engine.world_size()}: resume with the same number of processes")
        return state

    def restore(self, path: Path, trainables: list[Trainable]) -> None:
        """Load optimizer, scheduler and (sharded plugins) model state into boosted objects, then RNGs."""
        for t in trainables:
            if t.cfg.plugin != "ddp":
                t.booster.load_model(t.model, str(path / t.name))
            t.booster.load_optimizer(t.optimizer, str(path / f"{t.name}.optim"))
            t.booster.load_lr_scheduler(t.scheduler, str(path / f"{t.name}.sched"))
        rng_file = path / "rng" / f"rank-{engine.rank()}.pt"
        _set_rng_state(torch.load(rng_file, weights_only=False))


def model_source_for_resume(checkpoint: Path | None, name: str, plugin: str) -> Path | None:
    """Where a ddp run reloads weights from on resume (sharded plugins load after boosting)."""
    if checkpoint is None or plugin != "ddp":
        return None
    return checkpoint / name


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "colossalai", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            out[mod] = "absent"
    return out


def write_manifest(output_dir: str | Path, *, stage: str, config: dict[str, Any], inputs: dict[str, Any],
                   outputs: dict[str, str], metrics: dict[str, Any], started: float) -> Path:
    """The stage's record, written last: the next stage and the pipeline find their inputs here."""
    path = Path(output_dir) / MANIFEST
    if engine.is_main():
        atomic_write_json(path, {
            "stage": stage,
            "status": "complete",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_seconds": round(time.time() - started, 1),
            "world_size": engine.world_size(),
            "inputs": inputs,
            "outputs": outputs,
            "metrics": metrics,
            "versions": versions(),
            "config": config,
        })
    return path


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())
