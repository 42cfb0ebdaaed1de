"""Reward model: a scalar head on the SFT model, trained on preference pairs.

Single process:   python -m training.rm --config training/configs/rm.yaml [--resume] [KEY=VALUE ...]
Many processes:   torchrun --nproc_per_node 8 -m training.rm --config training/configs/rm.yaml --resume

Loss: -log sigmoid(r(chosen) - r(rejected)), with r the head's value at the last token.
Reports held-out accuracy (share of pairs ranked right) and margin. The output folder
``model/`` is a Hugging Face ``*ForTokenClassification`` (one label) that PPO loads as the
reward model and as the critic's starting point.

Exit codes: 0 done; 2 bad config or dataset (one ``error:`` line naming the field or file, e.g. a truncated
``.jsonl.gz``); 28 the disk filled while writing a checkpoint, the export or the manifest (one line naming the
path; the partial files are removed, ``latest`` keeps the last complete checkpoint, ``--resume`` after freeing space).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from training import runner
from training.config import RMConfig
from training.data import collate_preference, tokenize_preference
from training.losses import pairwise_loss
from training.models import last_token_values, load_value_model, token_values


def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected sequences from one forward pass over both."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(c_ids.size(1), r_ids.size(1))
    ids = torch.cat([F.pad(c_ids, (0, width - c_ids.size(1))), F.pad(r_ids, (0, width - r_ids.size(1)))])
    mask = torch.cat([F.pad(batch["chosen_attention_mask"], (0, width - c_ids.size(1))),
                      F.pad(batch["rejected_attention_mask"], (0, width - r_ids.size(1)))])
    scores = last_token_values(token_values(model, ids, mask), mask)
    return scores[: c_ids.size(0)], scores[c_ids.size(0):]


def rm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], int]:
    chosen, rejected = pair_scores(model, batch)
    loss = pairwise_loss(chosen, rejected)
    metrics = {"loss": loss.item(), "acc": (chosen > rejected).float().mean().item(),
               "margin": (chosen - rejected).mean().item(), "reward_chosen": chosen.mean().item(),
               "reward_rejected": rejected.mean().item()}
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return loss, metrics, tokens


def eval_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    chosen, rejected = pair_scores(model, batch)
    n = chosen.numel()
    return {"correct": (chosen > rejected).float().sum().item(), "margin_sum": (chosen - rejected).sum().item(),
            "loss_sum": pairwise_loss(chosen, rejected).item() * n, "count": float(n)}


def eval_summary(sums: dict[str, float]) -> dict[str, float]:
    """Held-out pairwise accuracy, mean margin and loss."""
    n = max(sums["count"], 1)
    return {"acc": sums.get("correct", 0.0) / n, "margin": sums.get("margin_sum", 0.0) / n,
            "loss": sums.get("loss_sum", 0.0) / n, "pairs": sums["count"]}


STAGE = runner.SupervisedStage(
    name="rm", config_cls=RMConfig, kind="preference", tokenize=tokenize_preference, collate=collate_preference,
    load_model=load_value_model, loss=rm_loss, eval_batch=eval_batch, eval_summary=eval_summary,
)


def main(argv: list[str] | None = None) -> int:
    return runner.run_supervised(STAGE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(runner.run_cli(main))
