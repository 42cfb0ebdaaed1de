"""PPO with a PTX loss: the RLHF stage of the ColossalChat recipe.

Single process:   python -m training.ppo --config training/configs/ppo.yaml [--resume] [KEY=VALUE ...]
Many processes:   torchrun --nproc_per_node 8 -m training.ppo --config training/configs/ppo.yaml --resume

Four models: the actor (policy, from the SFT model) and the critic (per-token values, from the
reward model) are trained; the reference (a frozen copy of the initial actor) and the reward
model are frozen. Each step samples a rollout from a batch of prompts (the experience buffer),
scores it (reward at the last token, a per-token KL penalty against the reference), computes
GAE advantages, then runs ``ppo_epochs`` passes of clipped policy and value updates over the
buffer, adding ``ptx_coef`` times the SFT loss on PTX data to the actor's loss.

Writes ``actor/`` (Hugging Face causal LM) and ``critic/`` beside ``metrics.jsonl`` and
``manifest.json``; checkpoints hold both models with their own optimizers and schedulers.

Rollouts (and the greedy held-out answers) come from ``training.rollout``: the serving engine over the actor's
weights, or the HF loop ``ppo.sample`` (``ppo.rollout_engine``); the losses' log-probs from the training forward.

Exit codes: 0 done; 2 bad config or dataset (one ``error:`` line naming the field or file, e.g. a truncated
``.jsonl.gz``); 28 the disk filled while writing a checkpoint, the export or the manifest (one line naming the
path; the partial files are removed, ``latest`` keeps the last complete checkpoint, ``--resume`` after freeing space).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from training import engine, losses, runner
from training.checkpoint import export_model
from training.config import ConfigError, GenerationConfig, PPOConfig, load_config, stage_arg_parser
from training.data import (
    ResumableSampler,
    collate_prompts,
    collate_sft,
    eos_token_ids,
    iterate_batches,
    load_rows,
    tokenize_conversation,
    tokenize_prompt,
)
from training.metrics import Throughput, read_metrics, train_flops_per_token
from training.models import (
    count_parameters,
    last_token_values,
    load_policy,
    load_tokenizer,
    load_value_model,
    position_ids,
    token_values,
)
from training.rollout import PhaseTimes, Rollout, make_rollout, rollout_seed


@torch.no_grad()
def sample(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen: GenerationConfig,
           eos_ids: list[int], pad_id: int, greedy: bool = False,
           tokenizer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (or, ``greedy``, decode) continuations of left-padded prompts with a KV cache, through the boosted
    model's forward.

    Returns (sequences [B, P+R], attention mask [B, P+R]); a row stops after its first EOS, or after the token that
    completes one of ``gen.stop`` in its answer decoded without special tokens (``tokenizer`` needed then).
    """
    if gen.stop and tokenizer is None:
        raise ValueError("generation.stop needs the tokenizer to decode answers")
    B = input_ids.size(0)
    mask = attention_mask
    pos = position_ids(mask)
    cur_ids, cur_pos, past = input_ids, pos, None
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(eos_ids, device=input_ids.device)
    tokens = []
    for _ in range(gen.max_new_tokens):
        out = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float() / gen.temperature
        if greedy:
            logits = logits.masked_fill(logits < logits.max(-1, keepdim=True).values, float("-inf"))
        elif gen.top_k:
            kth = torch.topk(logits, min(gen.top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if gen.top_p < 1:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > gen.top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        nxt = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        mask = torch.cat([mask, (~done).long().unsqueeze(1)], dim=1)
        done = done | torch.isin(nxt, eos)
        if gen.stop:
            answers = torch.stack(tokens, dim=1).tolist()
            for b in (~done).nonzero().flatten().tolist():
                text = tokenizer.decode(answers[b], skip_special_tokens=True)
                if any(s in text for s in gen.stop):
                    done[b] = True
        cur_ids, cur_pos = nxt.unsqueeze(1), cur_pos[:, -1:] + 1
        if bool(done.all()):
            break
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1), mask


def pack_right(seq: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """Move each row's prompt padding from the left to the right end: (sequences, mask, response starts [B]).

    Training forwards run on right-padded rows: a left-padding query sees no key at all, and some GPU attention
    kernels turn such fully masked rows into NaN gradients. Real tokens keep their order and positions, so the
    logits are those of the left-padded layout; row b's response fills columns ``start[b] .. start[b] + R - 1``.
    """
    prompt_pad = F.pad(mask[:, :prompt_len] == 0, (0, seq.size(1) - prompt_len), value=False)
    order = torch.sort(prompt_pad.to(torch.uint8), dim=1, stable=True).indices
    return seq.gather(1, order), mask.gather(1, order), mask[:, :prompt_len].sum(1)


def at_response(x: torch.Tensor, start: torch.Tensor, length: int, shift: int = -1) -> torch.Tensor:
    """Rows of ``x`` [B, T, ...] at columns ``start + shift + r`` for r < ``length`` (shift -1: the positions that
    predict the response tokens); [B, length, ...]."""
    cols = start.unsqueeze(1) + shift + torch.arange(length, device=x.device)
    return x[torch.arange(x.size(0), device=x.device).unsqueeze(1), cols]


def logprobs_at_response(logits: torch.Tensor, seq: torch.Tensor, start: torch.Tensor,
                         length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From full-sequence logits of right-packed rows: (log-probs of the response tokens [B, R], the logits that
    produced them [B, R, V])."""
    logits = at_response(logits, start, length)
    return losses.token_logprobs(logits, at_response(seq, start, length, shift=0)), logits


def response_logprobs(model: torch.nn.Module, seq: torch.Tensor, mask: torch.Tensor, start: torch.Tensor,
                      length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_at_response`` of ``model``'s forward over right-packed rows."""
    logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logprobs_at_response(logits, seq, start, length)


@dataclass
class Experience:
    """One rollout: the buffer that PPO's updates iterate over."""

    seq: torch.Tensor  # prompt + response, right-packed (see pack_right)
    mask: torch.Tensor
    start: torch.Tensor  # each row's first response column
    action_mask: torch.Tensor  # [B, R]: response tokens up to and including the first EOS
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float]

    def minibatches(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, self.seq.size(0), size):
            yield {k: getattr(self, k)[i:i + size] for k in
                   ("seq", "mask", "start", "action_mask", "logprobs", "values", "advantages", "returns")}


@torch.no_grad()
def make_experience(actor, critic, ref, reward_model, prompts: dict[str, torch.Tensor], cfg: PPOConfig,
                    eos_ids: list[int], pad_id: int, rollout: Rollout | None = None,
                    seed: int | None = None) -> Experience:
    """Generate (``rollout``; default: ``sample`` through the actor), score and compute advantages for one batch
    of prompts."""
    p = cfg.ppo
    with engine.eval_mode(actor, critic):
        if rollout is None:
            seq, mask = sample(actor, prompts["input_ids"], prompts["attention_mask"], p.generation, eos_ids, pad_id)
        else:
            seq, mask = rollout.generate(prompts["input_ids"], prompts["attention_mask"], p.generation, seed=seed)
        P = prompts["input_ids"].size(1)
        R = seq.size(1) - P
        action_mask = mask[:, P:].float()
        seq, mask, start = pack_right(seq, mask, P)
        logprobs, _ = response_logprobs(actor, seq, mask, start, R)
        ref_logprobs, _ = response_logprobs(ref, seq, mask, start, R)
        values = at_response(token_values(critic, seq, mask), start, R) * action_mask
        score = last_token_values(token_values(reward_model, seq, mask), mask).clamp(-p.reward_clip, p.reward_clip)
    rewards, kl = losses.shaped_rewards(score, logprobs.float(), ref_logprobs.float(), action_mask, p.kl_coef)
    advantages, returns = losses.gae(rewards, values, action_mask, p.gamma, p.lam)
    advantages = losses.whiten(advantages, action_mask)
    stats = {"reward": score.mean().item(), "kl": kl.sum(1).mean().item(),
             "response_length": action_mask.sum(1).mean().item(), "return": losses.masked_mean(returns,
                                                                                              action_mask).item()}
    return Experience(seq, mask, start, action_mask, logprobs.float(), values, advantages, returns, stats)


def evaluate_reward(actor, reward_model, prompts: list[list[int]], cfg: PPOConfig, eos_ids: list[int], pad_id: int,
                    device: torch.device, rollout: Rollout | None = None, tokenizer: Any = None) -> dict[str, float]:
    """Mean reward-model score and length of greedy answers to held-out prompts (``training.heldout``, shared with
    GRPO: the same prompts give the same "before")."""
    from training.heldout import evaluate_greedy

    def rm_score(seq: torch.Tensor, mask: torch.Tensor, idx: list[int], completions: list[str]) -> dict:
        return {"reward": last_token_values(token_values(reward_model, seq, mask), mask).float()}

    return evaluate_greedy(actor, prompts, rm_score, cfg.ppo.generation, train=cfg.train, eos_ids=eos_ids,
                           pad_id=pad_id, device=device, tokenizer=tokenizer, rollout=rollout)


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.size(1)), value=value)


def actor_loss(actor, mb: dict[str, torch.Tensor], ptx: dict[str, torch.Tensor] | None, cfg: PPOConfig,
               pad_id: int, *, one_pass: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss plus ``ptx_coef`` times the SFT loss on the PTX rows, for one backward.

    The rollout rows (prompt + reply) and the PTX rows (SFT conversations, often full length) go through the actor
    in two forward passes, each at its own width. ``one_pass`` pads both into one batch instead, which computes
    the padding: in the 1B bench (prompts of ~300 tokens + 128 generated, PTX rows of 1,024) that was ~30% of the
    actor's tokens. ``ppo.ptx_pass`` chooses; the plugins that manage parameters on hooks around one forward
    (gemini, zero2, 3d) keep the one pass."""
    seq, mask = mb["seq"], mb["mask"]
    n = seq.size(0)
    ptx_logits = None
    if ptx is not None and one_pass:
        width = max(seq.size(1), ptx["input_ids"].size(1))
        seq = torch.cat([_pad_to(seq, width, pad_id), _pad_to(ptx["input_ids"], width, pad_id)])
        mask = torch.cat([_pad_to(mask, width, 0), _pad_to(ptx["attention_mask"], width, 0)])
    logits = actor(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
    if ptx is not None:
        ptx_logits = logits[n:] if one_pass else actor(
            input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"],
            position_ids=position_ids(ptx["attention_mask"])).logits
    R = mb["action_mask"].size(1)
    logprobs, resp_logits = logprobs_at_response(logits[:n], mb["seq"], mb["start"], R)
    pg, clip_frac = losses.policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["action_mask"],
                                       cfg.ppo.clip_eps)
    stats = {"policy_loss": pg.item(), "clip_frac": clip_frac.item(),
             "entropy": losses.entropy(resp_logits.detach(), mb["action_mask"]).item(),
             "approx_kl": losses.masked_mean(mb["logprobs"] - logprobs.detach(), mb["action_mask"]).item()}
    loss = pg
    if ptx_logits is not None:
        ptx_loss, _ = losses.sft_loss(ptx_logits[:, : ptx["labels"].size(1)], ptx["labels"])
        loss = loss + cfg.ppo.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    return loss, stats


def critic_loss(critic, mb: dict[str, torch.Tensor], cfg: PPOConfig) -> tuple[torch.Tensor, float]:
    values = at_response(token_values(critic, mb["seq"], mb["mask"]), mb["start"], mb["action_mask"].size(1))
    loss = losses.value_loss(values, mb["values"], mb["returns"], mb["action_mask"], cfg.ppo.value_clip)
    return loss, loss.item()


def main(argv: list[str] | None = None) -> int:
    args = stage_arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(PPOConfig, args.config, args.overrides)
    if cfg.train.grad_accum_steps != 1:
        raise ConfigError("train.grad_accum_steps: PPO takes one optimizer step per mini-batch; set it to 1 "
                          "and size the buffer with ppo.rollout_batch_size")
    p = cfg.ppo
    stage = runner.start("ppo", cfg, resume=args.resume)

    tokenizer = load_tokenizer(cfg.model)
    splits = runner.load_data(cfg.data, "prompt", cfg.train.seed)
    prompt_rows, eval_rows, data_report = splits.train, splits.held, splits.report
    tokenize = partial(tokenize_prompt, tokenizer=tokenizer, max_length=cfg.data.max_length)
    prompts, data_report["prompts_too_long"] = runner.tokenize_all(prompt_rows, tokenize, "prompt")
    eval_prompts = [tokenize(row) for row in eval_rows]
    ptx: list = []
    if p.ptx_data and p.ptx_coef > 0:
        ptx_rows, ptx_stats = load_rows(p.ptx_data, "sft", on_error=cfg.data.on_error)
        ptx, _ = runner.tokenize_all(ptx_rows, partial(tokenize_conversation, tokenizer=tokenizer,
                                                       max_length=cfg.data.max_length), "PTX")
        data_report["ptx_rows"] = len(ptx)

    rm_cfg = cfg.model.model_copy(update={"path": p.reward_model_path, "gguf_file": None})
    critic_cfg = cfg.model.model_copy(update={"path": p.critic_path or p.reward_model_path, "gguf_file": None})
    actor = load_policy(cfg.model)
    critic = load_value_model(critic_cfg)
    ref = engine.frozen(load_policy(cfg.model, trainable=False), cfg.train, stage.device)
    reward_model = engine.frozen(load_value_model(rm_cfg, trainable=False), cfg.train, stage.device)
    for m in (actor, critic, reward_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    if stage.resume_from is not None and cfg.train.plugin == "ddp":
        runner.load_resume_weights(actor, stage.resume_from / "actor")
        runner.load_resume_weights(critic, stage.resume_from / "critic")
    n_params, n_trainable = count_parameters(actor)

    per_rollout = p.rollout_batch_size * engine.world_size()
    steps = cfg.train.max_steps or (len(prompts) // per_rollout) * cfg.train.epochs
    if steps < 1:
        raise ConfigError(f"data: {len(prompts)} prompts give no rollout of {per_rollout}; "
                          "lower ppo.rollout_batch_size or set train.max_steps")
    updates = steps * p.ppo_epochs * math.ceil(p.rollout_batch_size / cfg.train.micro_batch_size)
    actor_t = engine.boost("actor", actor, cfg.train, lr=cfg.train.lr, total_steps=updates, device=stage.device)
    critic_t = engine.boost("critic", critic, cfg.train, lr=p.critic_lr, total_steps=updates, device=stage.device)

    kw = {"rank": engine.rank(), "world_size": engine.world_size(), "shuffle": cfg.data.shuffle,
          "seed": cfg.train.seed}
    prompt_sampler = ResumableSampler(len(prompts), batch_size=p.rollout_batch_size, **kw)
    ptx_sampler = ResumableSampler(max(len(ptx), 1), batch_size=cfg.train.micro_batch_size, **kw)
    if stage.resume_from is not None:
        stage.checkpointer.restore(stage.resume_from, [actor_t, critic_t])
        prompt_sampler.load_state_dict(stage.state["sampler"])
        if ptx:
            ptx_sampler.load_state_dict(stage.state["ptx_sampler"])
    pad_id = tokenizer.pad_token_id
    prompt_batches = iterate_batches(prompts, prompt_sampler, p.rollout_batch_size,
                                     partial(collate_prompts, pad_id=pad_id))
    ptx_batches = iterate_batches(ptx, ptx_sampler, cfg.train.micro_batch_size,
                                  partial(collate_sft, pad_id=pad_id)) if ptx else None
    eos_ids = eos_token_ids(tokenizer)
    rollout = make_rollout(p, p.generation, "ppo", cfg.train, actor_t.model, tokenizer, eos_ids, stage.device,
                           cfg.data.max_length, p.rollout_batch_size)

    logger = runner.make_logger(stage, steps)
    meter = Throughput(stage.device, train_flops_per_token(actor.config, n_params, cfg.data.max_length))
    last: dict[str, float] = {}
    evaluate = partial(evaluate_reward, actor_t.model, reward_model, eval_prompts, cfg, eos_ids, pad_id, stage.device,
                       rollout, tokenizer)
    phases = PhaseTimes(stage.device)
    ptx_joint = (p.ptx_pass or ("separate" if cfg.train.plugin == "ddp" else "joint")) == "joint"
    before: dict[str, float] = {}
    if eval_prompts and stage.start_step == 0:
        before = evaluate()  # the policy before PPO
        logger.log(0, before, split="eval")
    elif eval_prompts and engine.is_main():
        before = next((r for r in read_metrics(stage.output_dir, "eval") if r["step"] == 0), {})
    for step in range(stage.start_step + 1, steps + 1):
        batch = {k: v.to(stage.device) for k, v in next(prompt_batches).items()}
        rollout.pop_timings()  # the held-out evaluations' generation is not this step's rollout
        with engine.autocast(cfg.train, stage.device):  # the precision the updates run in: ratio 1 before them
            exp = make_experience(actor_t.model, critic_t.model, ref, reward_model, batch, cfg, eos_ids, pad_id,
                                  rollout, rollout_seed(cfg.train.seed, step, engine.rank()))
        t_update = phases.now()
        sums: dict[str, float] = {}
        updates_done = 0
        actor_t.model.train()
        critic_t.model.train()
        for _ in range(p.ppo_epochs):
            for mb in exp.minibatches(cfg.train.micro_batch_size):
                ptx_batch = ({k: v.to(stage.device) for k, v in next(ptx_batches).items()}
                             if ptx_batches is not None else None)
                with engine.autocast(cfg.train, stage.device):
                    a_loss, a_stats = actor_loss(actor_t.model, mb, ptx_batch, cfg, pad_id,
                                                 one_pass=ptx_joint)
                if not math.isfinite(a_stats["policy_loss"]) or not math.isfinite(a_stats.get("ptx_loss", 0.0)):
                    raise FloatingPointError(f"step {step}: the actor's loss is not finite ({a_stats}); lower "
                                             "train.lr or use train.precision=fp32; the last checkpoint is intact")
                skipped_before = actor_t.skipped_updates + critic_t.skipped_updates
                actor_t.backward(a_loss)
                a_stats["actor_grad_norm"] = float(actor_t.step(skip_nonfinite=True))
                with engine.autocast(cfg.train, stage.device):
                    c_loss, c_value = critic_loss(critic_t.model, mb, cfg)
                critic_t.backward(c_loss)
                a_stats.update(value_loss=c_value, critic_grad_norm=float(critic_t.step(skip_nonfinite=True)))
                a_stats["skipped_frac"] = float(actor_t.skipped_updates + critic_t.skipped_updates > skipped_before)
                for k, v in a_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                updates_done += 1
                meter.add(int(mb["mask"].sum()))
        meter.add(0, steps=1)
        phases.end_step(rollout, t_update)
        logger.advance()
        if step % cfg.log.every == 0 or step == steps:
            last = {k: engine.all_reduce_mean(v / updates_done, stage.device) for k, v in sums.items()}
            last.update({k: engine.all_reduce_mean(v, stage.device) for k, v in exp.stats.items()})
            last.update({k: engine.all_reduce_mean(v, stage.device) for k, v in phases.report().items()})
            last.update(lr=actor_t.lr, critic_lr=critic_t.lr, **meter.report())
            logger.log(step, last)
        if eval_prompts and cfg.log.eval_every and step % cfg.log.eval_every == 0 and step != steps:
            logger.log(step, evaluate(), split="eval")
        runner.maybe_crash(step)
        if cfg.checkpoint.save_every and (step % cfg.checkpoint.save_every == 0 or step == steps):
            state = {"sampler": prompt_sampler.state_dict(), "ptx_sampler": ptx_sampler.state_dict(), "metrics": last}
            stage.checkpointer.save(step, [actor_t, critic_t], tokenizer, state)
    eval_metrics: dict[str, float] = {}
    if eval_prompts:
        after = evaluate()
        logger.log(steps, after, split="eval")
        eval_metrics = {"eval_reward_before": before.get("reward"), "eval_reward_after": after["reward"],
                        "eval_prompts": after["prompts"]}
    logger.close()
    rollout.close()

    export_model(actor_t, stage.output_dir / "actor", tokenizer)
    export_model(critic_t, stage.output_dir / "critic", tokenizer)
    runner.finish(stage, outputs={"model": str(stage.output_dir / "actor"), "actor": str(stage.output_dir / "actor"),
                                  "critic": str(stage.output_dir / "critic")},
                  inputs={"model": cfg.model.path, "reward_model": p.reward_model_path, "data": cfg.data.train,
                          "rollout": {"engine": rollout.name, **getattr(rollout, "info", {})}, **data_report},
                  metrics={**{"final_" + k: v for k, v in last.items()}, **eval_metrics, "steps": steps,
                           "parameters": n_params,
                           "trainable_parameters": n_trainable})
    return 0


if __name__ == "__main__":
    sys.exit(runner.run_cli(main))
