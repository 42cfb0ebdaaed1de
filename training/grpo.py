"""GRPO: group-relative policy optimisation, with reward models and/or rule-based (verifiable) rewards.

Single process:   python -m training.grpo --config training/configs/grpo.yaml [--resume] [KEY=VALUE ...]
Many processes:   torchrun --nproc_per_node 8 -m training.grpo --config training/configs/grpo.yaml --resume

Each step samples ``group_size`` (G) answers to each of ``rollout_batch_size`` prompts, scores them with the
weighted sum of ``grpo.rewards`` (an RM stage's model, and/or ``function: pkg.module:fn``, see
training/rewards.py), and uses each answer's reward minus its group's mean (over the group's std) as the
advantage of all its tokens: no critic, no value model. The loss is PPO's clipped surrogate plus ``kl_coef`` times
the KL to the frozen reference (the starting model). Models in memory: the policy, the reference, and a reward
model only if a reward term names one.

Held-out prompts are answered greedily before and after, scored by every reward term (a 0/1 rule's mean is its
pass rate). Writes ``model/`` (a Hugging Face causal LM) beside ``metrics.jsonl`` and ``manifest.json``.

Rollouts (and the greedy held-out answers) come from ``training.rollout``: the serving engine over the actor's
weights, or the HF loop ``ppo.sample`` (``grpo.rollout_engine``); the losses' log-probs from the training forward.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from training import engine, losses, runner
from training.checkpoint import export_model
from training.config import ConfigError, GRPOConfig, RewardSpec, import_function, load_config, stage_arg_parser
from training.data import Prompt, ResumableSampler, collate_prompts, eos_token_ids, iterate_batches, tokenize_prompt
from training.heldout import decode_answers, evaluate_greedy
from training.metrics import Throughput, read_metrics, train_flops_per_token
from training.models import (
    count_parameters,
    last_token_values,
    load_policy,
    load_tokenizer,
    load_value_model,
    token_values,
)
from training.ppo import pack_right, response_logprobs, sample
from training.rollout import PhaseTimes, Rollout, make_rollout, rollout_seed


@dataclass
class RewardTerm:
    """One configured reward, loaded: a frozen reward model or a Python function."""

    spec: RewardSpec
    field: str  # e.g. grpo.rewards.1.function, for error messages
    model: torch.nn.Module | None = None
    fn: Callable[..., Any] | None = None


def load_rewards(cfg: GRPOConfig, device: torch.device, pad_id: int) -> list[RewardTerm]:
    terms = []
    for i, spec in enumerate(cfg.grpo.rewards):
        if spec.function is not None:
            terms.append(RewardTerm(spec, f"grpo.rewards.{i}.function", fn=import_function(spec.function)))
            continue
        rm_cfg = cfg.model.model_copy(update={"path": spec.model, "gguf_file": None})
        rm = engine.frozen(load_value_model(rm_cfg, trainable=False), cfg.train, device)
        rm.config.pad_token_id = pad_id
        terms.append(RewardTerm(spec, f"grpo.rewards.{i}.model", model=rm))
    return terms


def score(terms: list[RewardTerm], seq: torch.Tensor, mask: torch.Tensor, prompts: list[Prompt],
          completions: list[str], clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total [B], each term's raw score [B]) of right-packed ``seq`` answering ``prompts``."""
    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros(seq.size(0), dtype=torch.float32, device=seq.device)
    for term in terms:
        if term.model is not None:
            s = last_token_values(token_values(term.model, seq, mask), mask).float().clamp(-clip, clip)
        else:
            try:
                got = term.fn(prompts=[p.messages[-1]["content"] for p in prompts], completions=completions,
                              messages=[[dict(m) for m in p.messages] for p in prompts])  # copies: ours stay intact
                values = [float(v) for v in got]
            except Exception as e:  # user code: say which configured reward failed, keep its traceback
                raise RuntimeError(f"{term.field}: {term.spec.function} failed: {e!r}") from e
            if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{term.field}: {term.spec.function} returned {len(values)} values for "
                                  f"{len(completions)} completions (or a non-finite one); it must return one "
                                  "finite float per completion")
            s = torch.tensor(values, dtype=torch.float32, device=seq.device)
        parts[term.spec.label] = s
        total = total + term.spec.weight * s
    return total, parts


@dataclass
class GroupExperience:
    """One step's samples: G per prompt, consecutive."""

    seq: torch.Tensor  # right-packed prompt + answer
    mask: torch.Tensor
    start: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor  # [B], one per sequence
    stats: dict[str, float]

    def minibatches(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, self.seq.size(0), size):
            yield {k: getattr(self, k)[i:i + size] for k in
                   ("seq", "mask", "start", "action_mask", "logprobs", "ref_logprobs", "advantages")}


@torch.no_grad()
def make_experience(actor, ref, terms: list[RewardTerm], batch: dict[str, torch.Tensor], prompts: list[Prompt],
                    cfg: GRPOConfig, tokenizer: Any, eos_ids: list[int], rollout: Rollout | None = None,
                    seed: int | None = None) -> GroupExperience:
    """Sample G answers per prompt (``rollout``; default: ``sample`` through the actor), score them, and turn the
    scores into group-relative advantages."""
    g = cfg.grpo
    pad_id = tokenizer.pad_token_id
    ids = batch["input_ids"].repeat_interleave(g.group_size, 0)
    attn = batch["attention_mask"].repeat_interleave(g.group_size, 0)
    grouped = [p for p in prompts for _ in range(g.group_size)]
    with engine.eval_mode(actor):
        if rollout is None:
            seq, mask = sample(actor, ids, attn, g.generation, eos_ids, pad_id, tokenizer=tokenizer)
        else:
            seq, mask = rollout.generate(ids, attn, g.generation, seed=seed)
        P, R = ids.size(1), seq.size(1) - ids.size(1)
        action_mask = mask[:, P:].float()
        completions = decode_answers(tokenizer, seq, mask, P)
        seq, mask, start = pack_right(seq, mask, P)
        rewards, parts = score(terms, seq, mask, grouped, completions, g.reward_clip)
        logprobs, _ = response_logprobs(actor, seq, mask, start, R)
        ref_logprobs, _ = response_logprobs(ref, seq, mask, start, R)
    advantages = losses.group_advantages(rewards, g.group_size, scale=g.scale_advantages)
    spread = rewards.view(-1, g.group_size).std(dim=1, unbiased=False)
    kl = losses.kl_penalty(logprobs.float(), ref_logprobs.float()) * action_mask
    stats = {"reward": rewards.mean().item(), "reward_group_std": spread.mean().item(),
             "zero_std_groups": (spread < 1e-6).float().mean().item(), "kl": kl.sum(1).mean().item(),
             "response_length": action_mask.sum(1).mean().item(),
             **{f"reward_{k}": v.mean().item() for k, v in parts.items()}}
    return GroupExperience(seq, mask, start, action_mask, logprobs.float(), ref_logprobs.float(), advantages, stats)


def evaluate_rewards(actor, terms: list[RewardTerm], prompts: list[tuple[list[int], Prompt]], cfg: GRPOConfig,
                     tokenizer: Any, eos_ids: list[int], device: torch.device,
                     rollout: Rollout | None = None) -> dict[str, float]:
    """Every reward term's mean over greedy answers to held-out prompts (``training.heldout``, shared with PPO: the
    same prompts give the same "before"); a 0/1 rule's mean is its pass rate."""

    def scores(seq: torch.Tensor, mask: torch.Tensor, idx: list[int], completions: list[str]) -> dict:
        total, parts = score(terms, seq, mask, [prompts[i][1] for i in idx], completions, cfg.grpo.reward_clip)
        return {"reward": total, **{t.spec.label: parts[t.spec.label] for t in terms}}

    return evaluate_greedy(actor, [p[0] for p in prompts], scores, cfg.grpo.generation, train=cfg.train,
                           eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, device=device, tokenizer=tokenizer,
                           rollout=rollout)


def main(argv: list[str] | None = None) -> int:
    args = stage_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(GRPOConfig, args.config, args.overrides)
    if cfg.train.grad_accum_steps != 1:
        raise ConfigError("train.grad_accum_steps: GRPO takes one optimizer step per mini-batch; set it to 1 "
                          "and size the step with grpo.rollout_batch_size and grpo.group_size")
    g = cfg.grpo
    stage = runner.start("grpo", cfg, resume=args.resume)

    tokenizer = load_tokenizer(cfg.model)
    splits = runner.load_data(cfg.data, "prompt", cfg.train.seed)
    prompt_rows, eval_rows, data_report = splits.train, splits.held, splits.report
    tokenize = partial(tokenize_prompt, tokenizer=tokenizer, max_length=cfg.data.max_length)
    prompts = [(tokenize(row), i) for i, row in enumerate(prompt_rows)]  # the index finds the row's messages
    eval_prompts = [(tokenize(row), row) for row in eval_rows]

    actor = load_policy(cfg.model)
    actor.config.pad_token_id = tokenizer.pad_token_id
    ref = engine.frozen(load_policy(cfg.model, trainable=False), cfg.train, stage.device)
    terms = load_rewards(cfg, stage.device, tokenizer.pad_token_id)
    if stage.resume_from is not None and cfg.train.plugin == "ddp":
        runner.load_resume_weights(actor, stage.resume_from / "model")
    n_params, n_trainable = count_parameters(actor)

    per_step = g.rollout_batch_size * engine.world_size()
    steps = cfg.train.max_steps or (len(prompts) // per_step) * cfg.train.epochs
    if steps < 1:
        raise ConfigError(f"data: {len(prompts)} prompts give no step of {per_step}; "
                          "lower grpo.rollout_batch_size or set train.max_steps")
    samples = g.rollout_batch_size * g.group_size
    updates = steps * g.ppo_epochs * math.ceil(samples / cfg.train.micro_batch_size)
    actor_t = engine.boost("model", actor, cfg.train, lr=cfg.train.lr, total_steps=updates, device=stage.device)

    sampler = ResumableSampler(len(prompts), rank=engine.rank(), world_size=engine.world_size(),
                               shuffle=cfg.data.shuffle, seed=cfg.train.seed, batch_size=g.rollout_batch_size)
    if stage.resume_from is not None:
        stage.checkpointer.restore(stage.resume_from, [actor_t])
        sampler.load_state_dict(stage.state["sampler"])

    def collate(items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        return {**collate_prompts([ids for ids, _ in items], pad_id=tokenizer.pad_token_id),
                "index": torch.tensor([i for _, i in items])}

    batches = iterate_batches(prompts, sampler, g.rollout_batch_size, collate)
    eos_ids = eos_token_ids(tokenizer)
    rollout = make_rollout(g, g.generation, "grpo", cfg.train, actor_t.model, tokenizer, eos_ids, stage.device,
                           cfg.data.max_length, g.rollout_batch_size * g.group_size)

    logger = runner.make_logger(stage, steps)
    meter = Throughput(stage.device, train_flops_per_token(actor.config, n_params, cfg.data.max_length))
    evaluate = partial(evaluate_rewards, actor_t.model, terms, eval_prompts, cfg, tokenizer, eos_ids, stage.device,
                       rollout)
    phases = PhaseTimes(stage.device)
    before: dict[str, float] = {}
    if eval_prompts and stage.start_step == 0:
        before = evaluate()  # the policy before GRPO
        logger.log(0, before, split="eval")
    elif eval_prompts and engine.is_main():
        before = next((r for r in read_metrics(stage.output_dir, "eval") if r["step"] == 0), {})
    last: dict[str, float] = {}
    for step in range(stage.start_step + 1, steps + 1):
        batch = next(batches)
        rows = [prompt_rows[i] for i in batch.pop("index").tolist()]
        batch = {k: v.to(stage.device) for k, v in batch.items()}
        rollout.pop_timings()  # the held-out evaluations' generation is not this step's rollout
        with engine.autocast(cfg.train, stage.device):  # the precision the updates run in: ratio 1 before them
            exp = make_experience(actor_t.model, ref, terms, batch, rows, cfg, tokenizer, eos_ids, rollout,
                                  rollout_seed(cfg.train.seed, step, engine.rank()))
        t_update = phases.now()
        sums: dict[str, float] = {}
        done = 0
        actor_t.model.train()
        for _ in range(g.ppo_epochs):
            for mb in exp.minibatches(cfg.train.micro_batch_size):
                with engine.autocast(cfg.train, stage.device):
                    logprobs, _ = response_logprobs(actor_t.model, mb["seq"], mb["mask"], mb["start"],
                                                    mb["action_mask"].size(1))
                    loss, parts = losses.grpo_loss(logprobs.float(), mb["logprobs"], mb["ref_logprobs"],
                                                   mb["advantages"], mb["action_mask"], g.clip_eps, g.kl_coef)
                if not math.isfinite(float(loss)):
                    raise FloatingPointError(f"step {step}: the GRPO loss is not finite; lower train.lr or use "
                                             "train.precision=fp32; the last checkpoint is intact")
                skipped = actor_t.skipped_updates
                actor_t.backward(loss)
                stats = {k: float(v) for k, v in parts.items()}
                stats["grad_norm"] = float(actor_t.step(skip_nonfinite=True))
                stats["skipped_frac"] = float(actor_t.skipped_updates > skipped)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                done += 1
                meter.add(int(mb["mask"].sum()))
        meter.add(0, steps=1)
        phases.end_step(rollout, t_update)
        logger.advance()
        if step % cfg.log.every == 0 or step == steps:
            last = {k: engine.all_reduce_mean(v / done, stage.device) for k, v in sums.items()}
            last.update({k: engine.all_reduce_mean(v, stage.device) for k, v in exp.stats.items()})
            last.update({k: engine.all_reduce_mean(v, stage.device) for k, v in phases.report().items()})
            last.update(lr=actor_t.lr, **meter.report())
            logger.log(step, last)
        if eval_prompts and cfg.log.eval_every and step % cfg.log.eval_every == 0 and step != steps:
            logger.log(step, evaluate(), split="eval")
        runner.maybe_crash(step)
        if cfg.checkpoint.save_every and (step % cfg.checkpoint.save_every == 0 or step == steps):
            stage.checkpointer.save(step, [actor_t], tokenizer, {"sampler": sampler.state_dict(), "metrics": last})
    eval_metrics: dict[str, Any] = {}
    if eval_prompts:
        after = evaluate()
        logger.log(steps, after, split="eval")
        for k in ("reward", *(t.spec.label for t in terms)):
            eval_metrics[f"eval_{k}_before"], eval_metrics[f"eval_{k}_after"] = before.get(k), after[k]
        eval_metrics["eval_prompts"] = after["prompts"]
    logger.close()
    rollout.close()

    export_model(actor_t, stage.output_dir / "model", tokenizer)
    runner.finish(stage, outputs={"model": str(stage.output_dir / "model")},
                  inputs={"model": cfg.model.path, "data": cfg.data.train, "prompts": len(prompts),
                          "rollout": {"engine": rollout.name, **getattr(rollout, "info", {})},
                          "rewards": [t.spec.model_dump(exclude_none=True) for t in terms], **data_report},
                  metrics={**{"final_" + k: v for k, v in last.items()}, **eval_metrics, "steps": steps,
                           "parameters": n_params, "trainable_parameters": n_trainable})
    return 0


if __name__ == "__main__":
    sys.exit(runner.run_cli(main))
