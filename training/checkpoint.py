"""Atomic, resumable checkpoints and the stage manifest.

Layout of a stage's ``output_dir``::

    checkpoints/step-000010/<name>/        model (Hugging Face safetensors + tokenizer), one per trained model
    checkpoints/step-000010/<name>.optim   optimizer state (file for ddp, folder for sharded plugins)
    checkpoints/step-000010/<name>.sched   LR scheduler state
    checkpoints/step-000010/rng/rank-N.pt  every RNG of every rank
    checkpoints/step-000010/state.json     step, sampler positions, last metrics
    checkpoints/latest                     name of the newest complete checkpoint
    <name>/                                the final export, e.g. model/ or actor/ + critic/
    best-step-000100/ + best.json          ``checkpoint.keep_best``: the export of the best held-out evaluation so
                                           far, and its step and metrics (copied to model/ at the end)
    manifest.json                          written last: the stage is complete when it exists

A checkpoint is built in a ``.tmp-`` folder and renamed into place only when every rank
has finished writing, so a killed process never leaves a half checkpoint that looks whole.
A full disk while writing a checkpoint, the export or the manifest raises ``DiskFullError``
(the stages exit with ``DISK_FULL_EXIT`` = 28, ENOSPC's number): the partial files are
removed and ``latest`` keeps naming the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import engine
from training.artifacts import (  # noqa: F401 - DISK_FULL_EXIT and the writers are re-exported for the stages
    DISK_FULL_EXIT,
    LATEST,
    MANIFEST,
    STATE,
    DiskFullError,
    _remove,
    atomic_write_json,
    atomic_write_text,
    is_disk_full,
    latest_checkpoint,
)
from training.artifacts import read_manifest as read_manifest  # re-exported: the manifest's writer and reader
from training.engine import Trainable


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


def _build_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a ``.tmp-`` folder beside ``folder`` (on every rank: a sharded save is collective), which
    then replaces ``folder``; a full disk removes the partial folder and raises ``DiskFullError``."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    if engine.is_main():
        _remove(tmp)
    engine.barrier()
    try:
        write(tmp)
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


def export_model(trainable: Trainable, folder: Path, tokenizer: Any) -> None:
    """The final model: LoRA merged, a plain Hugging Face folder, written atomically."""
    from training.models import merged_for_export

    def write(tmp: Path) -> None:
        if trainable.cfg.plugin == "ddp":
            if engine.is_main():
                merged = merged_for_export(trainable.model.unwrap(unwrap_peft=False))
                merged.save_pretrained(tmp, safe_serialization=True)
        else:
            trainable.booster.save_model(trainable.model, str(tmp), shard=True, use_safetensors=True)
        if engine.is_main():
            tokenizer.save_pretrained(tmp)

    _build_folder(folder, write)


BEST_FILE = "best.json"
LOWER_IS_BETTER = ("loss", "perplexity")  # keep_best minimises these metrics and maximises every other one


class BestModel:
    """``checkpoint.keep_best``: the export of the best held-out evaluation so far, so the stage can end with that
    model instead of the last step's. Like ``latest`` for checkpoints: each best is exported to its own
    ``best-step-N/`` (atomically, by ``export_model``), then ``best.json`` (step, metrics, folder) is replaced to
    point at it, then the older one goes; a crash anywhere leaves ``best.json`` naming a whole export. On resume a
    best from past the resumed checkpoint is dropped (those steps are redone and offered again), and exports that
    ``best.json`` does not name are removed."""

    def __init__(self, output_dir: Path, metric: str, resume_step: int | None):
        self.root, self.path, self.metric = output_dir, output_dir / BEST_FILE, metric
        self.lower = metric in LOWER_IS_BETTER
        self.step: int | None = None
        self.metrics: dict[str, float] = {}
        saved = json.loads(self.path.read_text()) if resume_step is not None and self.path.exists() else None
        if (saved and saved.get("metric") == metric and saved["step"] <= resume_step
                and (output_dir / saved["folder"]).is_dir()):
            self.step, self.metrics = saved["step"], saved["metrics"]
        if engine.is_main():
            if self.step is None:
                self.path.unlink(missing_ok=True)
            for old in output_dir.glob("best-step-*"):
                if old != self.dir:
                    _remove(old)
        engine.barrier()

    @property
    def dir(self) -> Path | None:
        return None if self.step is None else self.root / f"best-step-{self.step:06d}"

    def better(self, value: float) -> bool:
        if self.step is None:
            return True
        best = self.metrics[self.metric]
        return value < best if self.lower else value > best

    def offer(self, step: int, metrics: dict[str, float], trainable: Trainable, tokenizer: Any, *,
              final: bool = False) -> bool:
        """Export the model if ``metrics`` beat the best so far (ties keep the earlier); True if they did.
        ``final``: the last step's evaluation, whose model the stage exports anyway: only noted."""
        if not self.better(float(metrics[self.metric])):
            return False
        if final:
            self.step, self.metrics = step, {k: float(v) for k, v in metrics.items()}
            return True
        old = self.dir
        folder = self.root / f"best-step-{step:06d}"
        export_model(trainable, folder, tokenizer)
        self.step, self.metrics = step, {k: float(v) for k, v in metrics.items()}
        if engine.is_main():
            atomic_write_json(self.path, {"metric": self.metric, "step": step, "metrics": self.metrics,
                                          "folder": folder.name})
            if old is not None and old != folder:
                _remove(old)
        engine.barrier()
        return True

    def copy_to(self, folder: Path) -> None:
        """The best export becomes ``folder`` (built beside it, renamed into place)."""
        assert self.dir is not None, "no evaluation was offered"
        best = self.dir
        _build_folder(folder, lambda tmp: shutil.copytree(best, tmp) if engine.is_main() else None)

    def remove(self) -> None:
        """After the manifest (which records the best step and metrics): the copy in model/ is the output."""
        if engine.is_main():
            for old in self.root.glob("best-step-*"):
                _remove(old)
            self.path.unlink(missing_ok=True)
        engine.barrier()


class Checkpointer:
    """Saves and restores everything a stage needs to continue at the same step with the same data."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.root.parent)

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
