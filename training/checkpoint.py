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
"""

from __future__ import annotations

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
from training.artifacts import LATEST, MANIFEST, STATE, atomic_write_json, atomic_write_text, latest_checkpoint
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


def export_model(trainable: Trainable, folder: Path, tokenizer: Any) -> None:
    """The final model: LoRA merged, a plain Hugging Face folder, written atomically."""
    from training.models import merged_for_export

    tmp = folder.with_name(f".tmp-{folder.name}")
    if engine.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    engine.barrier()
    if trainable.cfg.plugin == "ddp":
        if engine.is_main():
            merged_for_export(trainable.model.unwrap(unwrap_peft=False)).save_pretrained(tmp, safe_serialization=True)
    else:
        trainable.booster.save_model(trainable.model, str(tmp), shard=True, use_safetensors=True)
    if engine.is_main():
        tokenizer.save_pretrained(tmp)
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
        for t in trainables:
            save_model(t, tmp / t.name, tokenizer)
            optim_path = tmp / f"{t.name}.optim"
            t.booster.save_optimizer(t.optimizer, str(optim_path), shard=t.cfg.plugin != "ddp")
            if engine.is_main():
                t.booster.save_lr_scheduler(t.scheduler, str(tmp / f"{t.name}.sched"))
        torch.save(_rng_state(), tmp / "rng" / f"rank-{engine.rank()}.pt")
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
