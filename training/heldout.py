"""The held-out greedy evaluation that PPO and GRPO share (and tests/gpu/alignment_table.py reuses): the same
prompts, answered greedily in the same batches through the same generator, scored per row.

One function, so that two stages evaluating the same starting model on the same split report the same "before".
On the H200 quality run (loadtest/results/h200/alignment/) PPO's and GRPO's held-out "before" were 0.445 and 0.493
on the same 91 prompts of the same SFT model, judged by the same RM. The two loops were copies, equal in code, and
in that run batched alike (PPO 32 rollouts, GRPO 8 x G=4), so the manifests do not pin the cause down; what differed
between the processes: GRPO clipped RM scores (at 10, never reached), each process's own bf16 autocast kernels over
a differently loaded set of models (greedy answers that part at one near-tied token then score apart), and a
resumed stage reads its "before" back from its first run's metrics.jsonl. With the copies gone only the last two
remain, and tests/gpu/alignment_table.py does not depend on them: it answers with this module's ``greedy_batch``
for the SFT model, PPO and GRPO in one process and scores them with one RM, one "before" for both (beside each
stage's own before/after, so the next GPU run shows whether the stages still disagree). The batch size is one number
(``EVAL_BATCH``) instead of each stage's rollout size (capped only by the engine's rollout rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from training import engine
from training.config import GenerationConfig, TrainConfig
from training.data import collate_prompts

# 32 rows: the quality configs' rollout size (PPO 32 rollouts, GRPO 4 prompts x G=8). The serving-engine rollout
# takes at most its rollout's rows, so with it a stage whose rollout is smaller evaluates in batches of that size.
EVAL_BATCH = 32

# score(seq, mask, indices, completions) -> {name: [B] tensor}: right-packed rows, which prompts they answer
# (indices into the prompt list) and the answers' text; "reward" is the headline number.
Scorer = Callable[[torch.Tensor, torch.Tensor, list[int], list[str]], dict[str, torch.Tensor]]


def decode_answers(tokenizer: Any, seq: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> list[str]:
    """The answers of left-padded ``seq`` (before packing) as text, special tokens removed."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(seq[:, prompt_len:].cpu(), mask[:, prompt_len:].cpu(), strict=True)]


@torch.no_grad()
def greedy_batch(actor: torch.nn.Module, prompts: list[list[int]], gen: GenerationConfig, eos_ids: list[int],
                 pad_id: int, device: torch.device, rollout: Any = None,
                 tokenizer: Any = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Greedy answers to one batch of token-id prompts: (left-padded seq, mask, prompt width)."""
    from training.ppo import sample  # the HF loop lives with PPO's rollout code

    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_id=pad_id).items()}
    if rollout is None:
        seq, mask = sample(actor, batch["input_ids"], batch["attention_mask"], gen, eos_ids, pad_id, greedy=True,
                           tokenizer=tokenizer)
    else:
        seq, mask = rollout.generate(batch["input_ids"], batch["attention_mask"], gen, greedy=True)
    return seq, mask, batch["input_ids"].size(1)


@torch.no_grad()
def evaluate_greedy(actor: torch.nn.Module, prompts: list[list[int]], score: Scorer, gen: GenerationConfig, *,
                    train: TrainConfig, eos_ids: list[int], pad_id: int, device: torch.device, tokenizer: Any,
                    rollout: Any = None, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Mean of every score (and of the answers' length) over greedy answers to ``prompts``, sharded over ranks.

    Every rank runs the same number of batches (collective plugins need that); padding prompts weigh zero. Returns
    ``{name: mean, ..., "response_length": mean, "prompts": count}``.
    """
    from training.ppo import pack_right

    batch_size = min(batch_size, getattr(rollout, "max_rows", batch_size))  # the engine takes at most a rollout
    world, rank = engine.world_size(), engine.rank()
    span = math.ceil(len(prompts) / world) * world
    mine = [(i, 1.0) if i < len(prompts) else (0, 0.0) for i in range(rank, span, world)]
    sums: dict[str, float] = {}
    count = 0.0
    with engine.eval_mode(actor), engine.autocast(train, device):
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            idx = [c[0] for c in chunk]
            seq, mask, P = greedy_batch(actor, [prompts[j] for j in idx], gen, eos_ids, pad_id, device, rollout,
                                        tokenizer)
            length = mask[:, P:].sum(1).float()
            completions = decode_answers(tokenizer, seq, mask, P) if tokenizer is not None else [""] * len(idx)
            seq, mask, _ = pack_right(seq, mask, P)
            cols = {**score(seq, mask, idx, completions), "response_length": length}
            weight = torch.tensor([c[1] for c in chunk], dtype=torch.float64)
            for name, col in cols.items():
                sums[name] = sums.get(name, 0.0) + float((col.double().cpu() * weight).sum())
            count += float(weight.sum())
    # every rank saw the same score names (the same scorer on the same number of batches)
    out = {name: engine.all_reduce_mean(s, device) * world for name, s in sums.items()}
    n = engine.all_reduce_mean(count, device) * world
    return {**{name: s / max(n, 1.0) for name, s in out.items()}, "prompts": n}
