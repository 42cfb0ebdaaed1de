"""Supervised fine-tuning: next-token loss on the assistant turns of chat conversations.

Single process:   python -m training.sft --config training/configs/sft.yaml [--resume] [train.lr=2e-5 ...]
Many processes:   torchrun --nproc_per_node 8 -m training.sft --config training/configs/sft.yaml --resume
Many nodes:       torchrun --nnodes 2 --node_rank $RANK --rdzv_endpoint $HOST:29500 -m training.sft --config ...

Writes ``output_dir/model`` (Hugging Face safetensors + tokenizer), ``metrics.jsonl``,
TensorBoard logs, resumable ``checkpoints/`` and, last, ``manifest.json``.

Exit codes: 0 done; 2 bad config or dataset (one ``error:`` line naming the field or file, e.g. a truncated
``.jsonl.gz``); 28 the disk filled while writing a checkpoint, the export or the manifest (one line naming the
path; the partial files are removed, ``latest`` keeps the last complete checkpoint, ``--resume`` after freeing space).
"""

from __future__ import annotations

import math
import sys

import torch

from training import runner
from training.config import SFTConfig
from training.data import collate_sft, tokenize_conversation
from training.losses import sft_loss
from training.models import load_policy


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                             torch.Tensor]:
    """Loss, metrics and token count, all left on the device (read only when a step is logged)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss, _ = sft_loss(out.logits, batch["labels"])
    return loss, {"loss": loss.detach()}, batch["attention_mask"].sum()


def eval_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss, n = sft_loss(out.logits, batch["labels"])
    return {"loss_sum": loss.item() * int(n), "count": float(n)}


def eval_summary(sums: dict[str, float]) -> dict[str, float]:
    """Token-weighted held-out loss and perplexity."""
    loss = sums.get("loss_sum", 0.0) / max(sums["count"], 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": sums["count"]}


STAGE = runner.SupervisedStage(
    name="sft", config_cls=SFTConfig, kind="sft", tokenize=tokenize_conversation, collate=collate_sft,
    load_model=load_policy, loss=lm_loss, eval_batch=eval_batch, eval_summary=eval_summary,
)


def main(argv: list[str] | None = None) -> int:
    return runner.run_supervised(STAGE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(runner.run_cli(main))
