"""Direct preference optimisation: the SFT model learns from preference pairs against a frozen reference.

Single process:   python -m training.dpo --config training/configs/dpo.yaml [--resume] [KEY=VALUE ...]
Many processes:   torchrun --nproc_per_node 8 -m training.dpo --config training/configs/dpo.yaml --resume

Loss: -log sigmoid(beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)]) (``dpo.loss: ipo``
for IPO's squared loss; ``dpo.label_smoothing`` for conservative DPO's), with log pi the sum over the reply's
tokens only. The reference is the SFT model (``dpo.reference_path``); by default it scores every pair once before
training (``reference_logps.pt`` in the output folder, reused on ``--resume``), so only the policy is in memory
while training: two models' worth of memory at most, against PPO's four. Held-out metrics: loss, implicit-reward
accuracy (share of pairs whose chosen reply gains more log-ratio than the rejected one) and margin. Writes
``model/`` (a Hugging Face causal LM).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training import engine, runner
from training.config import DPOConfig
from training.data import collate_dpo, tokenize_preference
from training.losses import dpo_loss, sequence_logprobs
from training.models import load_policy

REFERENCE_FILE = "reference_logps.pt"


def pair_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response log-probs of the chosen and rejected sequences from one forward pass over both; ([B], [B])."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(c_ids.size(1), r_ids.size(1))

    def both(key: str) -> torch.Tensor:
        c, r = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
        return torch.cat([F.pad(c, (0, width - c.size(1))), F.pad(r, (0, width - r.size(1)))])

    ids, mask = both("input_ids"), both("attention_mask")
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = sequence_logprobs(logits, ids, both("loss_mask"))
    return logp[: c_ids.size(0)], logp[c_ids.size(0):]


def reference_logprobs(ref: torch.nn.Module | None, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """The reference's log-probs: precomputed ones carried by the batch, or a no-grad pass of ``ref``."""
    if ref is None:
        return batch["ref_chosen_logp"], batch["ref_rejected_logp"]
    with torch.no_grad():
        return pair_logprobs(ref, batch)


def dpo_step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, ref: torch.nn.Module | None,
                  cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Loss, metrics and token count, left on the device (read when a step is logged)."""
    chosen, rejected = pair_logprobs(model, batch)
    ref_c, ref_r = reference_logprobs(ref, batch)
    loss, r_c, r_r = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing)
    metrics = {"loss": loss.detach(), "acc": (r_c > r_r).float().mean(), "margin": (r_c - r_r).mean(),
               "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(), "logp_chosen": chosen.detach().mean(),
               "logp_rejected": rejected.detach().mean()}
    return loss, metrics, batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()


def eval_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, ref: torch.nn.Module | None,
               cfg: DPOConfig) -> dict[str, float]:
    chosen, rejected = pair_logprobs(model, batch)
    ref_c, ref_r = reference_logprobs(ref, batch)
    loss, r_c, r_r = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing)
    n = chosen.numel()
    return {"correct": (r_c > r_r).float().sum().item(), "margin_sum": (r_c - r_r).sum().item(),
            "loss_sum": loss.item() * n, "count": float(n)}


def eval_summary(sums: dict[str, float]) -> dict[str, float]:
    """Held-out implicit-reward accuracy, mean margin (beta-scaled log-ratio) and loss."""
    n = max(sums["count"], 1)
    return {"acc": sums.get("correct", 0.0) / n, "margin": sums.get("margin_sum", 0.0) / n,
            "loss": sums.get("loss_sum", 0.0) / n, "pairs": sums["count"]}


def _fingerprint(examples: list[dict], reference: str) -> str:
    h = hashlib.sha256(reference.encode())
    for ex in examples:
        h.update(json.dumps([ex["chosen_input_ids"], ex["rejected_input_ids"], ex["chosen_prompt_len"],
                             ex["rejected_prompt_len"]]).encode())
    return h.hexdigest()


@torch.no_grad()
def score_with_reference(ref: torch.nn.Module, examples: list[dict], pad_id: int, cfg: DPOConfig,
                         device: torch.device) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every example, each rank scoring its share."""
    out = torch.zeros(len(examples), 2, dtype=torch.float32, device=device)
    mine = list(range(engine.rank(), len(examples), engine.world_size()))
    size = cfg.train.micro_batch_size
    for i in range(0, len(mine), size):
        idx = mine[i:i + size]
        batch = {k: v.to(device) for k, v in collate_dpo([examples[j] for j in idx], pad_id=pad_id).items()}
        with engine.autocast(cfg.train, device):
            c, r = pair_logprobs(ref, batch)
        out[idx] = torch.stack([c, r], dim=1).float()
    if engine.world_size() > 1:
        dist.all_reduce(out)  # every row was written by exactly one rank
    return out.cpu()


def precompute_reference(stage: runner.Stage, load_ref: Callable[[], torch.nn.Module],
                         examples: dict[str, list[dict]], pad_id: int, reference: str) -> dict[str, Any]:
    """Attach ``ref_chosen_logp``/``ref_rejected_logp`` to every example: from ``reference_logps.pt`` when resuming
    with the same tokenized pairs and reference (the reference is then not even loaded), else from one scoring pass
    (then stored, atomically). Returns what the manifest records."""
    cfg: DPOConfig = stage.cfg
    path = stage.output_dir / REFERENCE_FILE
    prints = {name: _fingerprint(exs, reference) for name, exs in examples.items()}
    stored = torch.load(path, weights_only=True) if stage.resume_from is not None and path.exists() else None
    reused = stored is not None and all(stored.get(f"{n}_fingerprint") == p for n, p in prints.items())
    if not reused:
        ref = load_ref()
        stored = {}
        for name, exs in examples.items():
            stored[name] = score_with_reference(ref, exs, pad_id, cfg, stage.device)
            stored[f"{name}_fingerprint"] = prints[name]
        del ref
        if stage.device.type == "cuda":
            torch.cuda.empty_cache()  # the policy and its optimizer get the reference's memory
        if engine.is_main():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save(stored, tmp)
            os.replace(tmp, path)
        engine.barrier()
    for name, exs in examples.items():
        for ex, (c, r) in zip(exs, stored[name].tolist(), strict=True):
            ex["ref_chosen_logp"], ex["ref_rejected_logp"] = c, r
    return {"reference_logps": str(path), "reference_logps_reused": reused}


def setup(stage: runner.Stage, tokenizer: Any, train: list[dict], held: list[dict],
          report: dict[str, Any], test: list[dict] | None = None) -> dict[str, Any]:
    """The loss's extra arguments: the frozen reference to keep, or (``precompute_reference``) None once every pair
    carries its reference log-probs."""
    cfg: DPOConfig = stage.cfg
    reference = cfg.dpo.reference_path or cfg.model.path
    ref_cfg = cfg.model.model_copy(update={"path": reference, "gguf_file": None if cfg.dpo.reference_path else
                                           cfg.model.gguf_file})

    def load_ref() -> torch.nn.Module:
        return engine.frozen(load_policy(ref_cfg, trainable=False), cfg.train, stage.device)

    report["reference"] = reference
    if not cfg.dpo.precompute_reference:
        return {"ref": load_ref(), "cfg": cfg}
    splits = {"train": train, "eval": held, **({"test": test} if test else {})}
    report.update(precompute_reference(stage, load_ref, splits, tokenizer.pad_token_id, reference))
    return {"ref": None, "cfg": cfg}


STAGE = runner.SupervisedStage(
    name="dpo", config_cls=DPOConfig, kind="preference", tokenize=tokenize_preference, collate=collate_dpo,
    load_model=load_policy, loss=dpo_step_loss, eval_batch=eval_batch, eval_summary=eval_summary, setup=setup,
)


def main(argv: list[str] | None = None) -> int:
    return runner.run_supervised(STAGE, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(runner.run_cli(main))

