"""What the stages share: start-up, data preparation, resume, and the supervised loop of SFT, RM and DPO.

PPO and GRPO have their own loops (rollouts, then updates) but use the same start-up and resume.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training import engine
from training.checkpoint import BestModel, Checkpointer
from training.config import ConfigError, DataConfig, StageConfig, dump_config
from training.engine import Trainable
from training.metrics import MetricsLogger, Throughput

log = logging.getLogger("training")

SUPERVISED = ("sft", "rm", "dpo")  # the stages of ``run_supervised``
CRASH_ENV = "TRAINING_CRASH_AFTER_STEP"  # fault injection for resume tests: hard-exit after this step


@dataclass
class Stage:
    """A running stage: its config, device, output folder and the checkpoint it resumes from."""

    name: str
    cfg: Any
    device: torch.device
    output_dir: Path
    checkpointer: Checkpointer
    resume_from: Path | None
    state: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def start_step(self) -> int:
        return int(self.state.get("step", 0))


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove it takes a file, or raise a ConfigError naming checkpoint.output_dir."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"checkpoint.output_dir: {folder} is not writable ({e})") from e


def start(name: str, cfg: StageConfig, *, resume: bool) -> Stage:
    """Initialise the process group, check the output folder and find the checkpoint to resume from."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    device = engine.init_distributed(cfg.train)
    if cfg.model.lora.rank > 0 and cfg.train.plugin != "ddp":
        raise ConfigError(f"model.lora with train.plugin: {cfg.train.plugin} is not supported; use ddp for LoRA")
    if cfg.checkpoint.keep_best and name not in SUPERVISED:
        raise ConfigError(f"checkpoint.keep_best: only {', '.join(SUPERVISED)} keep a best model; {name} ends with "
                          "its last step's (its held-out reward is in metrics.jsonl at every log.eval_every)")
    out = Path(cfg.checkpoint.output_dir)
    if engine.is_main():
        check_writable(out)
    engine.barrier()
    ckpt = Checkpointer(out, cfg.checkpoint.keep_last)
    resume_from = ckpt.latest() if resume else None
    if resume and resume_from is None and engine.is_main():
        log.info("--resume: no checkpoint in %s, starting from scratch", out / "checkpoints")
    stage = Stage(name, cfg, device, out, ckpt, resume_from)
    if resume_from is not None:
        stage.state = ckpt.read_state(resume_from)
        if engine.is_main():
            log.info("resuming from %s (step %d)", resume_from, stage.start_step)
    return stage


@dataclass
class DataSplits:
    """A stage's rows: ``train``; ``held`` (what it evaluates on while training: the eval rows, or with
    ``data.validation_fraction`` the validation cut of the training rows); ``test`` (with a validation cut, the eval
    rows, scored only once, by the model the stage ends with); ``report`` (counts for the manifest)."""

    train: list
    held: list
    test: list
    report: dict[str, Any]


def load_data(cfg: DataConfig, kind: str, seed: int) -> DataSplits:
    """Read, validate and split rows."""
    from training.data import load_rows, split_eval

    train, stats = load_rows(cfg.train, kind, on_error=cfg.on_error, max_samples=cfg.max_samples)
    report: dict[str, Any] = {"train_rows": stats.rows, "train_skipped": stats.skipped}
    if cfg.eval:
        held, estats = load_rows(cfg.eval, kind, on_error=cfg.on_error)
        report.update(eval_rows=estats.rows, eval_skipped=estats.skipped)
    elif cfg.eval_fraction > 0:
        train, held = split_eval(train, cfg.eval_fraction, seed)
        report["eval_rows"] = len(held)
    else:
        held = []
    test: list = []
    if cfg.validation_fraction > 0:  # a second, differently seeded cut of what is left for training
        test = held
        train, held = split_eval(train, cfg.validation_fraction, seed + 1)
        report.update(validation_rows=len(held), test_rows=report.pop("eval_rows", 0))
    if stats.skipped and engine.is_main():
        log.warning("skipped %d malformed rows; first: %s", stats.skipped, stats.errors[:3])
    return DataSplits(train, held, test, report)


def tokenize_all(items: list, fn: Callable[[Any], Any], what: str) -> tuple[list, int]:
    """Tokenize every item; items that do not fit (fn returns None) are dropped and counted."""
    out = [t for t in (fn(x) for x in items) if t is not None]
    dropped = len(items) - len(out)
    if not out:
        raise ConfigError(f"data: no {what} example fits data.max_length; raise it or check the data")
    return out, dropped


def total_steps(cfg: StageConfig, num_examples: int) -> int:
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * engine.world_size()
    if cfg.train.max_steps:
        return cfg.train.max_steps
    steps = (num_examples // per_step) * cfg.train.epochs
    if steps < 1:
        raise ConfigError(f"data: {num_examples} examples give no full step of {per_step}; "
                          "lower train.micro_batch_size or set train.max_steps")
    return steps


def load_resume_weights(model: nn.Module, folder: Path) -> None:
    """Overwrite a freshly loaded model with a ddp checkpoint's weights (full model or LoRA adapter)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"checkpoint {folder} holds no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    try:
        from peft import PeftModel, set_peft_model_state_dict
    except ImportError:  # pragma: no cover
        PeftModel = ()  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def maybe_crash(step: int) -> None:
    """Hard-exit (no cleanup, like a killed pod) after ``step`` when the crash variable names it."""
    if os.environ.get(CRASH_ENV) == str(step):
        os._exit(17)


# (loss, metrics, tokens); metrics and tokens may stay device tensors: they are read only when a step is logged.
LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any], Any]]


def supervised_loop(stage: Stage, trainable: Trainable, batches: Iterator[dict[str, torch.Tensor]], sampler: Any,
                    loss_fn: LossFn, *, steps: int, logger: MetricsLogger, flops_per_token: float, tokenizer: Any,
                    evaluate: Callable[[], dict[str, float]] | None = None, eval_every: int = 0,
                    on_eval: Callable[[int, dict[str, float]], Any] | None = None) -> dict[str, float]:
    """Optimise ``trainable`` for ``steps`` steps from the stage's start step; returns the last metrics.
    ``on_eval(step, metrics)`` sees every evaluation made every ``eval_every`` steps (``checkpoint.keep_best``)."""
    cfg = stage.cfg
    accum = cfg.train.grad_accum_steps
    meter = Throughput(stage.device, flops_per_token)
    trainable.model.train()
    last: dict[str, float] = {}
    for step in range(stage.start_step + 1, steps + 1):
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = {k: v.to(stage.device) for k, v in next(batches).items()}
            with trainable.no_sync(micro == accum - 1), engine.autocast(cfg.train, stage.device):
                loss, m, tokens = loss_fn(batch)
            trainable.backward(loss / accum)
            meter.add(tokens)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        grad_norm = trainable.step()
        meter.add(0, steps=1)
        logger.advance()
        if step % cfg.log.every == 0 or step == steps:
            last = {k: engine.all_reduce_mean(v, stage.device) for k, v in sums.items()}
            last.update(lr=trainable.lr, grad_norm=float(grad_norm), **meter.report())
            logger.log(step, last)
        if evaluate is not None and eval_every and step % eval_every == 0 and step != steps:
            ev = evaluate()
            logger.log(step, ev, split="eval")
            if on_eval is not None:
                on_eval(step, ev)
            trainable.model.train()
        maybe_crash(step)
        if cfg.checkpoint.save_every and (step % cfg.checkpoint.save_every == 0 or step == steps):
            stage.checkpointer.save(step, [trainable], tokenizer, {"sampler": sampler.state_dict(), "metrics": last})
    return last


def make_logger(stage: Stage, steps: int) -> MetricsLogger:
    """The stage's metrics log; on resume, lines past the checkpoint are dropped (they will be redone)."""
    logger = MetricsLogger(stage.output_dir, tensorboard=stage.cfg.log.tensorboard, progress=stage.cfg.log.progress,
                           total_steps=steps, initial_step=stage.start_step, desc=stage.name)
    if stage.resume_from is not None:
        logger.truncate_after(stage.start_step)
    elif engine.is_main() and logger.path.exists():
        logger.path.unlink()
    return logger


def finish(stage: Stage, *, outputs: dict[str, str], inputs: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write the manifest (the stage's completion mark) last."""
    from training.checkpoint import write_manifest

    write_manifest(stage.output_dir, stage=stage.name, config=dump_config(stage.cfg), inputs=inputs,
                   outputs=outputs, metrics=metrics, started=stage.started)
    engine.barrier()
    if engine.is_main():
        log.info("%s complete: %s", stage.name, stage.output_dir / "manifest.json")


def run_cli(main: Callable[[], int]) -> int:
    """Run a stage entry point; one clear line on stderr and a documented exit code for the expected failures.

    Exit 2: a bad config or dataset (never worth a retry). Exit 28 (``DISK_FULL_EXIT``, ENOSPC's number): the disk
    filled while writing a checkpoint, the export or the manifest; partial files are removed and ``latest`` still
    names the last complete checkpoint, so ``--resume`` continues from it once there is room.
    """
    from training.checkpoint import DISK_FULL_EXIT, DiskFullError
    from training.data import DataError

    try:
        return main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:
        print(f"error: {e}", file=sys.stderr)
        return DISK_FULL_EXIT


@dataclass
class SupervisedStage:
    """The parts in which SFT and RM differ; ``run_supervised`` does the rest."""

    name: str
    config_cls: type[StageConfig]
    kind: str  # data kind for training.data.load_rows
    tokenize: Callable[..., Any]  # (item, tokenizer=, max_length=) -> example | None
    collate: Callable[..., dict[str, torch.Tensor]]  # (examples, pad_id=) -> batch
    load_model: Callable[[Any], nn.Module]  # (ModelConfig) -> model
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float], int]]
    eval_batch: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]]  # sums, with a "count" key
    eval_summary: Callable[[dict[str, float]], dict[str, float]]  # sums -> reported metrics
    # (stage, tokenizer, train, held, data report, test=) -> extra keyword arguments of loss and eval_batch; runs before
    # the model is loaded (DPO scores its pairs with the reference here, or loads the reference to keep)
    setup: Callable[..., dict[str, Any]] | None = None


@torch.no_grad()
def evaluate(spec: SupervisedStage, model: nn.Module, examples: list, pad_id: int, stage: Stage,
             extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Sum ``spec.eval_batch`` over held-out examples on every rank, then summarise."""
    model.eval()
    size = stage.cfg.train.micro_batch_size
    split = len(examples) >= engine.world_size()  # else every rank scores everything (same keys on all ranks)
    shard = examples[engine.rank()::engine.world_size()] if split else examples
    sums: dict[str, float] = {}
    for i in range(0, len(shard), size):
        batch = {k: v.to(stage.device) for k, v in spec.collate(shard[i:i + size], pad_id=pad_id).items()}
        with engine.autocast(stage.cfg.train, stage.device):
            for k, v in spec.eval_batch(model, batch, **(extra or {})).items():
                sums[k] = sums.get(k, 0.0) + v
    scale = engine.world_size() if split else 1
    totals = {k: engine.all_reduce_mean(v, stage.device) * scale for k, v in sorted(sums.items())}
    totals.setdefault("count", 0.0)
    return spec.eval_summary(totals)


def run_supervised(spec: SupervisedStage, argv: list[str] | None, description: str) -> int:
    """config -> tokenizer -> data -> model -> booster -> resume -> train -> export -> manifest."""
    from functools import partial

    from training.checkpoint import export_model
    from training.config import load_config, stage_arg_parser
    from training.data import ResumableSampler, iterate_batches
    from training.metrics import train_flops_per_token
    from training.models import count_parameters, load_tokenizer

    args = stage_arg_parser(description).parse_args(argv)
    cfg = load_config(spec.config_cls, args.config, args.overrides)
    stage = start(spec.name, cfg, resume=args.resume)

    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, spec.kind, cfg.train.seed)
    data_report = splits.report
    tokenize = partial(spec.tokenize, tokenizer=tokenizer, max_length=cfg.data.max_length)
    train, data_report["train_too_long"] = tokenize_all(splits.train, tokenize, spec.kind)
    held = [t for t in map(tokenize, splits.held) if t is not None]
    test = [t for t in map(tokenize, splits.test) if t is not None]
    best = best_keeper(spec, stage, held)
    extra = spec.setup(stage, tokenizer, train, held, data_report, test=test) if spec.setup is not None else {}

    model = spec.load_model(cfg.model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if stage.resume_from is not None and cfg.train.plugin == "ddp":
        load_resume_weights(model, stage.resume_from / "model")
    n_params, n_trainable = count_parameters(model)
    steps = total_steps(cfg, len(train))
    trainable = engine.boost("model", model, cfg.train, lr=cfg.train.lr, total_steps=steps, device=stage.device)

    sampler = ResumableSampler(len(train), rank=engine.rank(), world_size=engine.world_size(),
                               shuffle=cfg.data.shuffle, seed=cfg.train.seed, batch_size=cfg.train.micro_batch_size)
    if stage.resume_from is not None:
        stage.checkpointer.restore(stage.resume_from, [trainable])
        sampler.load_state_dict(stage.state["sampler"])
    pad_id = tokenizer.pad_token_id
    batches = iterate_batches(train, sampler, cfg.train.micro_batch_size, partial(spec.collate, pad_id=pad_id))

    logger = make_logger(stage, steps)
    eval_fn = (lambda: evaluate(spec, trainable.model, held, pad_id, stage, extra)) if held else None
    final = supervised_loop(stage, trainable, batches, sampler, partial(spec.loss, trainable.model, **extra),
                            steps=steps,
                            logger=logger, flops_per_token=train_flops_per_token(model.config, n_params,
                                                                                 cfg.data.max_length),
                            tokenizer=tokenizer, evaluate=eval_fn, eval_every=cfg.log.eval_every,
                            on_eval=(lambda step, ev: best.offer(step, ev, trainable, tokenizer)) if best else None)
    metrics = {"final_" + k: v for k, v in final.items()}
    if eval_fn is not None:
        ev = eval_fn()
        logger.log(steps, ev, split="eval")
        metrics.update({"eval_" + k: v for k, v in ev.items()})
        if best is not None:
            best.offer(steps, ev, trainable, tokenizer, final=True)
            metrics.update({"last_eval_" + k: v for k, v in ev.items()}, best_step=best.step,
                           best_metric=best.metric, **{"eval_" + k: v for k, v in best.metrics.items()})
    out = stage.output_dir / "model"
    if best is not None and best.step != steps:
        best.copy_to(out)
    else:
        export_model(trainable, out, tokenizer)
    if test:  # scored once, by the model the stage ends with (the validation cut chose it)
        scorer = trainable.model if best is None or best.step == steps else load_export(spec, cfg, out, stage)
        tv = evaluate(spec, scorer, test, pad_id, stage, extra)
        logger.log(steps, tv, split="test")
        metrics.update({"test_" + k: v for k, v in tv.items()})
    logger.close()
    finish(stage, outputs={"model": str(out)},
           inputs={"model": cfg.model.path, "data": cfg.data.train, **data_report},
           metrics={**metrics, "steps": steps, "parameters": n_params, "trainable_parameters": n_trainable})
    if best is not None:
        best.remove()
    return 0


def best_keeper(spec: SupervisedStage, stage: Stage, held: list) -> BestModel | None:
    """``checkpoint.keep_best``'s keeper, after checking the stage has held-out rows and reports that metric."""
    metric = stage.cfg.checkpoint.keep_best
    if not metric:
        return None
    if stage.cfg.model.lora.rank > 0:  # the export merges LoRA into the weights in place: not mid-training
        raise ConfigError("checkpoint.keep_best with model.lora is not supported: the export merges the adapter "
                          "into the model; drop one of them")
    if not held:
        raise ConfigError("checkpoint.keep_best needs held-out rows: set data.eval, data.eval_fraction or "
                          "data.validation_fraction")
    names = [k for k in spec.eval_summary({"count": 0.0}) if k not in ("pairs", "tokens", "count")]
    if metric not in names:
        raise ConfigError(f"checkpoint.keep_best: {spec.name} reports no held-out metric {metric!r}; it reports "
                          f"{', '.join(names)}")
    return BestModel(stage.output_dir, metric, stage.start_step if stage.resume_from is not None else None)


def load_export(spec: SupervisedStage, cfg: StageConfig, folder: Path, stage: Stage) -> nn.Module:
    """The exported model in ``folder`` (LoRA already merged), on the stage's device, for scoring only."""
    from training.config import LoraConfig

    model = spec.load_model(cfg.model.model_copy(update={"path": str(folder), "gguf_file": None,
                                                         "lora": LoraConfig()}))
    return model.to(stage.device).eval()
