"""The whole recipe in order: SFT -> reward model -> PPO (or DPO, or GRPO) -> GPTQ, each through its own stage CLI.

    python -m training.pipeline --config training/configs/demo/pipeline.yaml
    python -m training.pipeline --config training/configs/demo/pipeline.yaml alignment=dpo   # DPO instead of PPO
    python -m training.pipeline --config training/configs/demo/pipeline.yaml --launcher torchrun --nproc-per-node 2
    python -m training.pipeline --config FILE --from rm              # redo rm and everything after it
    python -m training.pipeline --config FILE sft:train.max_steps=4  # per-stage overrides (STAGE:key=value)
    python -m training.pipeline --config FILE --dry-run              # show what would run

Each stage runs as a separate process with exactly the command a Kubernetes Job uses
(``python -m training.<stage> --config FILE [--resume] [key=value ...]``, optionally under torchrun).
A stage whose ``manifest.json`` is newer than every earlier stage's is complete and skipped; a stage
that was interrupted (a checkpoint but no manifest) is continued with ``--resume``; a stage whose
input was redone is run again from scratch. ``max_restarts`` re-launches a failed stage from its
last checkpoint, like torchrun's own restarts. The pipeline's record, ``<run_dir>/pipeline.json``,
says for each stage what happened, how long it took and what it produced.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from training.artifacts import MANIFEST, atomic_write_json, latest_checkpoint, read_manifest
from training.config import (  # noqa: F401 - the pipeline's config classes, re-exported where they are used
    BaseModelSpec,
    ConfigError,
    GRPOConfig,
    PipelineConfig,
    StageSpec,
    load_config,
    parse_overrides,
)

# Stage name -> config class, so every config is validated before the first stage starts.
CONFIG_CLASSES = {
    "sft": "training.config:SFTConfig",
    "rm": "training.config:RMConfig",
    "ppo": "training.config:PPOConfig",
    "dpo": "training.config:DPOConfig",
    "grpo": "training.config:GRPOConfig",
    "quantize": "training.config:QuantizeConfig",
}
ALIGNMENT_STAGES = ("ppo", "dpo", "grpo")
# The metric shown for each stage in the summary (first one present wins).
KEY_METRICS = {
    "sft": ("eval_loss", "final_loss"),
    "rm": ("eval_acc", "final_acc", "eval_loss", "final_loss"),
    "ppo": ("eval_reward_after", "final_reward", "final_actor_loss"),
    "dpo": ("eval_acc", "final_acc", "final_loss"),
    "grpo": ("eval_reward_after", "final_reward"),
    "quantize": ("perplexity.gptq", "gptq_vs_source", "checkpoint_bytes"),
}
CONFIG_ERROR_EXIT = 2  # the stages' exit code for a bad config or dataset: never retried
NO_RESTART = {CONFIG_ERROR_EXIT, -signal.SIGINT, -signal.SIGTERM}  # bad input, or stopped on purpose


@dataclass
class StagePlan:
    """A stage resolved against the disk: its validated config, output folder and what to do."""

    spec: StageSpec
    output_dir: Path
    action: Literal["skip", "run", "resume"] = "run"
    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML; ``overrides`` are ``key=value`` (pipeline) or ``STAGE:key=value`` (one stage)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"pipeline config not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline config {path} must be a mapping at the top level")
    stage_over: dict[str, list[str]] = {}
    top: list[str] = []
    for item in overrides or []:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            stage_over.setdefault(head, []).append(rest)
        else:
            top.append(item)
    for key, value in parse_overrides(top).items():
        raw[key] = value
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"invalid pipeline config {path}:"]
        lines += [f"  {'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None
    names = {s.name for s in cfg.stages}
    unknown = sorted(set(stage_over) - names)
    if unknown:
        raise ConfigError(f"override for unknown stage(s) {unknown}; stages are {sorted(names)}")
    for s in cfg.stages:
        s.overrides = [*s.overrides, *stage_over.get(s.name, [])]
    apply_alignment(cfg)
    return cfg


def apply_alignment(cfg: PipelineConfig) -> list[str]:
    """Keep only the chosen alignment stage, drop rm when nothing needs it, and point quantize at the chosen stage's
    output; returns the names left out."""
    if cfg.alignment is None:
        return []
    names = [s.name for s in cfg.stages]
    if cfg.alignment not in names:
        raise ConfigError(f"alignment: {cfg.alignment} is not one of the stages {names}; add a stage named "
                          f"{cfg.alignment} or pick another")
    chosen = next(s for s in cfg.stages if s.name == cfg.alignment)
    needs_rm = cfg.alignment == "ppo"
    if cfg.alignment == "grpo" and chosen.module is None:
        try:
            needs_rm = load_config(GRPOConfig, chosen.config, chosen.overrides).grpo.needs_reward_model
        except ConfigError as e:
            raise ConfigError(f"stage grpo: {e}") from None
    drop = {n for n in ALIGNMENT_STAGES if n != cfg.alignment} | (set() if needs_rm else {"rm"})
    cfg.stages = [s for s in cfg.stages if s.name not in drop]
    for s in cfg.stages:
        if s.name == "quantize":  # first, so the stage's own overrides still win
            s.overrides = [f"model.path={stage_output_dir(chosen)}", *s.overrides]
    return sorted(drop & set(names))


def config_class(spec: StageSpec) -> type[BaseModel] | None:
    """The stage's config class, by its name or its training.<stage> module; None for modules of other kinds."""
    key = spec.name if spec.module is None else spec.module.removeprefix("training.")  # e.g. a 2nd grpo stage
    target = CONFIG_CLASSES.get(key)
    if target is None:
        return None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def stage_output_dir(spec: StageSpec) -> Path:
    """Validate the stage's config (with its overrides) and return ``checkpoint.output_dir``."""
    cls = config_class(spec)
    try:
        if cls is not None:
            return Path(load_config(cls, spec.config, spec.overrides).checkpoint.output_dir)  # type: ignore[attr-defined]
        data = yaml.safe_load(Path(spec.config).read_text(encoding="utf-8")) or {}
    except ConfigError as e:
        raise ConfigError(f"stage {spec.name}: {e}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"stage {spec.name}: config file not found: {spec.config}") from e
    for key, value in parse_overrides(spec.overrides).items():
        data[key] = value
    out = (data.get("checkpoint") or {}).get("output_dir")
    if not out:
        raise ConfigError(f"stage {spec.name}: {spec.config} sets no checkpoint.output_dir")
    return Path(out)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def plan(cfg: PipelineConfig, *, redo_from: str | None = None) -> list[StagePlan]:
    """Decide per stage: skip (complete and newer than its inputs), resume (interrupted) or run."""
    names = [s.name for s in cfg.stages]
    if redo_from is not None and redo_from not in names:
        raise ConfigError(f"--from {redo_from}: no such stage; stages are {names}")
    plans: list[StagePlan] = []
    upstream_done = 0.0  # newest manifest time among earlier stages
    upstream_redo = False
    for spec in cfg.stages:
        out = stage_output_dir(spec)
        p = StagePlan(spec, out)
        manifest = out / MANIFEST
        upstream_redo = upstream_redo or spec.name == redo_from
        ckpt = latest_checkpoint(out)
        if upstream_redo:
            p.action, p.reason = "run", "redo requested" if spec.name == redo_from else "an earlier stage runs first"
        elif manifest.exists() and _mtime(manifest) >= upstream_done:
            p.action, p.reason = "skip", "complete (manifest.json)"
        elif manifest.exists():
            p.action, p.reason = "run", "an earlier stage finished after it: stale"
            upstream_redo = True
        elif ckpt is not None and _mtime(ckpt / "state.json") >= upstream_done:
            p.action, p.reason = "resume", f"interrupted; continuing from {ckpt.name}"
        else:
            p.action, p.reason = "run", "not started" if ckpt is None else "checkpoint older than its input"
        if p.action != "skip":
            upstream_redo = True
        upstream_done = max(upstream_done, _mtime(manifest))
        plans.append(p)
    return plans


def stage_command(spec: StageSpec, cfg: PipelineConfig, *, resume: bool) -> list[str]:
    """The exact command line a Kubernetes Job would run for this stage."""
    launcher = spec.launcher or cfg.launcher
    cmd = [sys.executable]
    if launcher == "torchrun":
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc_per_node}"]
    cmd += ["-m", spec.module_name, "--config", spec.config]
    if resume:
        cmd.append("--resume")
    return cmd + spec.overrides


def prepare_base_model(spec: BaseModelSpec) -> str:
    """Convert the packaged GGUF into ``spec.path`` if it is not there yet; returns what was done."""
    from training.convert_gguf import ConvertError, convert, is_converted, packaged_gguf

    out = Path(spec.path)
    if (out / "config.json").exists() and (is_converted(out) or not (spec.gguf or spec.convert_from_package)):
        return f"{out} present"
    if not (spec.gguf or spec.convert_from_package):
        raise ConfigError(f"base_model.path: {out} does not exist and no convert_from_package/gguf is set")
    try:
        gguf = Path(spec.gguf) if spec.gguf else packaged_gguf(spec.convert_from_package or "")
        convert(gguf, out)
    except ConvertError as e:
        raise ConfigError(f"base_model: {e}") from e
    return f"converted {gguf.name} -> {out}"


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def key_metric(stage: str, metrics: dict[str, Any]) -> tuple[str, Any] | None:
    """(name, value) of the metric that best summarises a stage, from its manifest."""
    for name in KEY_METRICS.get(stage, ()):
        node: Any = metrics
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, int | float):
            return name, node
    for name, value in metrics.items():
        if isinstance(value, int | float) and name not in ("steps", "parameters", "trainable_parameters"):
            return name, value
    return None


def artifact_rows(plans: list[StagePlan]) -> list[dict[str, Any]]:
    """Per stage: status, wall time, produced model folder, its size and the key metric (from the manifests)."""
    rows = []
    for p in plans:
        manifest = read_manifest(p.output_dir) or {}
        model = (manifest.get("outputs") or {}).get("model")
        metric = key_metric(p.spec.name, manifest.get("metrics") or {})
        status = p.result.get("status", "skipped" if p.action == "skip" else "pending")
        rows.append({"stage": p.spec.name, "status": status,
                     "seconds": p.result.get("seconds", manifest.get("wall_seconds")),
                     "output_dir": str(p.output_dir), "model": model,
                     "bytes": folder_bytes(Path(model)) if model else None,
                     "metric": metric[0] if metric else None, "value": metric[1] if metric else None})
    return rows


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def print_summary(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "status", "time", "model", "size", "key metric"):
        table.add_column(col, overflow="fold")
    for r in rows:
        value = r["value"]
        shown = "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
        secs = r["seconds"]
        table.add_row(r["stage"], r["status"], "-" if secs is None else f"{secs:.0f} s", r["model"] or "-",
                      _human_bytes(r["bytes"]), f"{r['metric']} = {shown}" if r["metric"] else "-")
    Console(stderr=False).print(table)


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def run_stage(p: StagePlan, cfg: PipelineConfig, env: dict[str, str]) -> int:
    """Run one stage (restarting from its last checkpoint up to ``max_restarts`` times); returns its exit code."""
    resume = p.action == "resume"
    started = time.time()
    restarts = 0
    while True:
        cmd = stage_command(p.spec, cfg, resume=resume)
        _say(f"{p.spec.name}: {' '.join(cmd[1:])}")
        rc = subprocess.call(cmd, env={**env, **p.spec.env})
        if rc == 0 and (p.output_dir / MANIFEST).exists():
            break
        if rc == 0:
            rc = 1
            _say(f"{p.spec.name}: exited 0 but wrote no {p.output_dir / MANIFEST}")
        if rc in NO_RESTART or restarts >= cfg.max_restarts:
            break
        restarts += 1
        resume = latest_checkpoint(p.output_dir) is not None
        _say(f"{p.spec.name}: exited {rc}; restart {restarts}/{cfg.max_restarts}"
             + (" from the last checkpoint" if resume else " from scratch"))
    p.result = {"status": ("resumed" if p.action == "resume" or restarts else "ran") if rc == 0 else "failed",
                "exit_code": rc, "restarts": restarts, "seconds": round(time.time() - started, 1)}
    return rc


def write_record(cfg: PipelineConfig, plans: list[StagePlan], started: float, config_path: str) -> Path:
    path = Path(cfg.run_dir) / "pipeline.json"
    atomic_write_json(path, {
        "name": cfg.name, "config": config_path,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "stages": [{**row, "action": p.action, "reason": p.reason, **p.result}
                   for p, row in zip(plans, artifact_rows(plans), strict=True)],
    })
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="Pipeline YAML (see training/configs/demo/pipeline.yaml).")
    ap.add_argument("--launcher", choices=["python", "torchrun"], help="Override the pipeline's launcher.")
    ap.add_argument("--nproc-per-node", type=int, help="Processes per stage under torchrun.")
    ap.add_argument("--max-restarts", type=int, help="Re-launch a failed stage from its last checkpoint N times.")
    ap.add_argument("--from", dest="redo_from", metavar="STAGE", help="Run this stage and all later ones again.")
    ap.add_argument("--only", help="Comma-separated stages to consider (others are left alone).")
    ap.add_argument("--dry-run", action="store_true", help="Print the plan and the commands, run nothing.")
    ap.add_argument("overrides", nargs="*", help="key=value for the pipeline, STAGE:key=value for one stage.")
    args = ap.parse_args(argv)
    started = time.time()
    try:
        cfg = load_pipeline(args.config, args.overrides)
        if args.launcher:
            cfg.launcher = args.launcher
        if args.nproc_per_node:
            cfg.nproc_per_node = args.nproc_per_node
        if args.max_restarts is not None:
            cfg.max_restarts = args.max_restarts
        if args.only:
            keep = [s.strip() for s in args.only.split(",") if s.strip()]
            unknown = sorted(set(keep) - {s.name for s in cfg.stages})
            if unknown:
                raise ConfigError(f"--only: unknown stage(s) {unknown}")
            cfg.stages = [s for s in cfg.stages if s.name in keep]
        if cfg.base_model is not None and not args.dry_run:
            _say(f"base model: {prepare_base_model(cfg.base_model)}")
        plans = plan(cfg, redo_from=args.redo_from)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT

    for p in plans:
        _say(f"{p.spec.name:<9} {p.action:<7} {p.reason}")
    if args.dry_run:
        for p in plans:
            if p.action != "skip":
                print(" ".join(stage_command(p.spec, cfg, resume=p.action == "resume")))
        return 0

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **cfg.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    rc = 0
    for i, p in enumerate(plans):
        if p.action == "skip":
            p.result = {"status": "skipped"}
            continue
        _say(f"stage {i + 1}/{len(plans)}: {p.spec.name} ({p.reason})")
        rc = run_stage(p, cfg, env)
        write_record(cfg, plans, started, args.config)
        if rc != 0:
            _say(f"{p.spec.name} failed with exit code {rc}; fix the cause and run the same command again "
                 "to continue from its last checkpoint")
            break
    record = write_record(cfg, plans, started, args.config)
    print_summary(artifact_rows(plans), f"{cfg.name}: {time.time() - started:.0f} s")
    _say(f"record: {record}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
