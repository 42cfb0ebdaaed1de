"""One side-by-side table of the alignment recipes, from a finished quality pipeline run (JSON on stdout and in
$OUT/alignment_table.json).

    python tests/gpu/alignment_table.py --pipeline training/configs/quality-gpu/pipeline.yaml [STAGE:key=value ...]

The pipeline must hold stages named rm, ppo, dpo, grpo (RM reward) and grpo_rule (rule rewards); a missing one
leaves its rows out. Rows:
- DPO vs RM: held-out implicit-reward accuracy of DPO against the RM's pairwise accuracy, on the same pairs (the two
  configs' data blocks and seeds must be equal; checked, reported as same_pairs).
- PPO vs GRPO, judged by the same RM on the same held-out prompts (PPO's split; GRPO's data block must equal it):
  greedy answers of the starting (SFT) model, the PPO actor and the GRPO model are generated here, in one code
  path, and scored by the RM: reward before (SFT) / after, win rate over the SFT answer (ties count half), KL to the
  reference (one sampled answer per held-out prompt, sum over its tokens of log pi - log pi_ref), wall time and peak
  memory of the stage (from its manifest and metrics.jsonl).
- GRPO with the arithmetic rule: held-out greedy pass rate (and format rate) before/after, from its manifest.

On CPU with a tiny model it is a smoke check of the mechanics (the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training import runner  # noqa: E402
from training.artifacts import read_manifest, stage_model  # noqa: E402
from training.config import GenerationConfig, load_config  # noqa: E402
from training.data import collate_prompts, eos_token_ids, tokenize_prompt  # noqa: E402
from training.heldout import greedy_batch  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.models import last_token_values, load_policy, load_tokenizer, load_value_model, token_values  # noqa: E402
from training.pipeline import config_class, load_pipeline, stage_output_dir  # noqa: E402
from training.ppo import pack_right, response_logprobs, sample  # noqa: E402

BATCH = 128  # the whole held-out set (91 HH prompts) in one batched greedy pass per model
MAX_PROMPTS = 128


def peak_gib(out: Path) -> float | None:
    peaks = [r["peak_mem_gib"] for r in read_metrics(out) if isinstance(r.get("peak_mem_gib"), int | float)]
    return round(max(peaks), 2) if peaks else None


def stage_facts(out: Path) -> dict[str, Any]:
    m = read_manifest(out) or {}
    return {"steps": (m.get("metrics") or {}).get("steps"), "wall_s": m.get("wall_seconds"), "peak_gib": peak_gib(out)}


@torch.no_grad()
def answers(model, prompts: list[list[int]], gen: GenerationConfig, eos_ids: list[int], pad_id: int,
            device: torch.device, greedy: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(right-packed seq, mask, start, R) per batch of prompts; greedy ones through the stages' own held-out path."""
    out = []
    for i in range(0, len(prompts), BATCH):
        chunk = prompts[i:i + BATCH]
        with autocast(device):
            if greedy:
                seq, mask, P = greedy_batch(model, chunk, gen, eos_ids, pad_id, device)
            else:
                batch = {k: v.to(device) for k, v in collate_prompts(chunk, pad_id=pad_id).items()}
                seq, mask = sample(model, batch["input_ids"], batch["attention_mask"], gen, eos_ids, pad_id)
                P = batch["input_ids"].size(1)
        seq, mask, start = pack_right(seq, mask, P)
        out.append((seq, mask, start, seq.size(1) - P))
    return out


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)


@torch.no_grad()
def rm_scores(rm, batches) -> torch.Tensor:
    scores = []
    for seq, mask, _, _ in batches:
        with autocast(seq.device):
            scores.append(last_token_values(token_values(rm, seq, mask), mask).float().cpu())
    return torch.cat(scores)


@torch.no_grad()
def sampled_kl(policy, ref, batches) -> float:
    """Mean over answers of sum_t (log pi - log pi_ref) on the answer's tokens (answers sampled from pi)."""
    total, n = 0.0, 0
    for seq, mask, start, R in batches:
        with autocast(seq.device):
            lp, _ = response_logprobs(policy, seq, mask, start, R)
            lr, _ = response_logprobs(ref, seq, mask, start, R)
        live = torch.stack([mask[b, start[b]:start[b] + R] for b in range(seq.size(0))]).float()
        total += float(((lp.float() - lr.float()) * live).sum())
        n += seq.size(0)
    return total / max(n, 1)


def load_lm(path: str, like, device: torch.device):
    model = load_policy(like.model_copy(update={"path": path, "gguf_file": None}), trainable=False)
    return model.eval().to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def dpo_vs_rm(cfgs: dict, outs: dict) -> dict[str, Any]:
    """With ``data.validation_fraction`` (and ``checkpoint.keep_best``) DPO chose its model on a validation cut of
    its training pairs and scored the held-out pairs once, as ``test_*``: those are the RM's eval pairs."""
    rm_m, dpo_m = (read_manifest(outs[n])["metrics"] for n in ("rm", "dpo"))
    held = "test_" if "test_acc" in dpo_m else "eval_"
    rm_data, dpo_data = (cfgs[n].data.model_copy(update={"validation_fraction": 0.0}) for n in ("rm", "dpo"))
    same = rm_data == dpo_data and cfgs["rm"].train.seed == cfgs["dpo"].train.seed
    acc = dpo_m.get(held + "acc")
    return {"same_pairs": same and rm_m.get("eval_pairs") == dpo_m.get(held + "pairs"),
            "pairs": dpo_m.get(held + "pairs"), "rm_accuracy": rm_m.get("eval_acc"), "dpo_implicit_accuracy": acc,
            "dpo_margin": dpo_m.get(held + "margin"), "dpo_loss": dpo_m.get(held + "loss"),
            "dpo_at_least_rm": (acc or 0) >= (rm_m.get("eval_acc") or 1),
            "dpo_lr": cfgs["dpo"].train.lr, "dpo_beta": cfgs["dpo"].dpo.beta, "dpo_epochs": cfgs["dpo"].train.epochs,
            "dpo_label_smoothing": cfgs["dpo"].dpo.label_smoothing,
            "dpo_validation": {"pairs": dpo_m.get("eval_pairs"), "acc": dpo_m.get("eval_acc"),
                               "best_step": dpo_m.get("best_step"), "steps": dpo_m.get("steps")}
            if held == "test_" else None,
            "rm": stage_facts(outs["rm"]), "dpo": stage_facts(outs["dpo"])}


def ppo_vs_grpo(specs: dict, cfgs: dict, outs: dict, device: torch.device, table: dict, write) -> None:
    """Fills table["ppo_vs_grpo"] as it goes (written after every model, so a failure keeps what was measured)."""
    base = cfgs["ppo"] if "ppo" in cfgs else cfgs["grpo"]
    tokenizer = load_tokenizer(base.model)
    eval_rows = runner.load_data(base.data, "prompt", base.train.seed).held
    prompts = [tokenize_prompt(r, tokenizer, base.data.max_length) for r in eval_rows][:MAX_PROMPTS]
    gen = base.ppo.generation if "ppo" in cfgs else base.grpo.generation
    eos = eos_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    rm = load_value_model(base.model.model_copy(update={"path": str(outs["rm"]), "gguf_file": None}),
                          trainable=False).eval().to(device)
    rm.config.pad_token_id = pad
    ref = load_lm(base.model.path, base.model, device)  # the starting (SFT) model and the reference
    t = time.time()
    sft_scores = rm_scores(rm, answers(ref, prompts, gen, eos, pad, device, greedy=True))
    rows: dict[str, Any] = {"prompts": len(prompts), "judge": str(outs["rm"]),
                            "sft_reward": round(float(sft_scores.mean()), 4), "sft_seconds": round(time.time() - t, 1)}
    table["ppo_vs_grpo"] = rows
    write()
    for name in ("ppo", "grpo"):
        if name not in specs:
            continue
        try:
            t = time.time()
            if name == "grpo" and "ppo" in cfgs:
                rows["grpo_same_prompts"] = cfgs["grpo"].data == cfgs["ppo"].data and \
                    cfgs["grpo"].train.seed == cfgs["ppo"].train.seed
                rows["grpo_same_generation"] = cfgs["grpo"].grpo.generation == cfgs["ppo"].ppo.generation
            policy = load_lm(str(stage_model(outs[name])), base.model, device)
            scores = rm_scores(rm, answers(policy, prompts, gen, eos, pad, device, greedy=True))
            diff = scores - sft_scores
            torch.manual_seed(0)
            kl = sampled_kl(policy, ref, answers(policy, prompts, gen, eos, pad, device, greedy=False))
            m = read_manifest(outs[name])["metrics"]
            stage_eval = ((m.get("eval_reward_before"), m.get("eval_reward_after")) if name == "ppo"
                          else (m.get("eval_rm_before"), m.get("eval_rm_after")))
            rows[name] = {"reward_before": round(float(sft_scores.mean()), 4),
                          "reward_after": round(float(scores.mean()), 4),
                          "win_rate_vs_sft": round(float(((diff > 1e-6).float() + 0.5 * (diff.abs() <= 1e-6).float())
                                                         .mean()), 4),
                          "kl_to_reference": round(kl, 4), "train_kl_last": m.get("final_kl"),
                          "stage_eval_reward_before_after": stage_eval, **stage_facts(outs[name]),
                          "table_seconds": round(time.time() - t, 1)}
            del policy
        except Exception as e:  # noqa: BLE001 -- one missing or broken stage is reported, the other rows kept
            rows[name] = {"error": repr(e)}
        write()


def grpo_rule(outs: dict) -> dict[str, Any]:
    m = read_manifest(outs["grpo_rule"])["metrics"]
    return {"task": "arithmetic (training/rewards.py)", "prompts": m.get("eval_prompts"),
            "pass_rate_before": m.get("eval_arithmetic_correct_before"),
            "pass_rate_after": m.get("eval_arithmetic_correct_after"),
            "format_rate_before": m.get("eval_answer_format_before"),
            "format_rate_after": m.get("eval_answer_format_after"),
            "train_zero_std_groups_last": m.get("final_zero_std_groups"), **stage_facts(outs["grpo_rule"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="training/configs/quality-gpu/pipeline.yaml")
    ap.add_argument("--stages", default="", help="comma-separated stage names to report (default: all the pipeline's)")
    ap.add_argument("overrides", nargs="*", help="STAGE:key=value, as given to the pipeline")
    args = ap.parse_args(argv)
    t0 = time.time()
    pipe = load_pipeline(args.pipeline, args.overrides)
    only = {n for n in args.stages.split(",") if n}
    unknown = only - {s.name for s in pipe.stages}
    if unknown:
        ap.error(f"--stages names {sorted(unknown)}, not stages of {args.pipeline}")
    specs = {s.name: s for s in pipe.stages if not only or s.name in only}
    cfgs = {n: load_config(config_class(s), s.config, s.overrides) for n, s in specs.items()}
    outs = {n: stage_output_dir(s) for n, s in specs.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table: dict[str, Any] = {"machine": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                             "pipeline": args.pipeline, "overrides": args.overrides}
    out_dir = Path(os.environ.get("OUT") or outs[next(iter(outs))].parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []

    def write() -> str:  # after every part: a later failure (or the call's time limit) keeps what was measured
        table["table_seconds"] = round(time.time() - t0, 1)
        text = json.dumps(table, indent=2, default=str)
        tmp = out_dir / ".alignment_table.json.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out_dir / "alignment_table.json")
        return text

    parts = [("dpo_vs_rm", {"rm", "dpo"}, lambda: table.__setitem__("dpo_vs_rm", dpo_vs_rm(cfgs, outs))),
             ("grpo_rule", {"grpo_rule"}, lambda: table.__setitem__("grpo_rule", grpo_rule(outs))),
             ("ppo_vs_grpo", {"rm"}, lambda: ppo_vs_grpo(specs, cfgs, outs, device, table, write))]
    for name, needs, fill in parts:
        if not needs <= specs.keys() or (name == "ppo_vs_grpo" and not {"ppo", "grpo"} & specs.keys()):
            continue
        try:
            fill()
        except Exception as e:  # noqa: BLE001 -- the table is written with the error in its place
            errors.append(f"{name}: {e!r}")
            table.setdefault(name, {})["error"] = repr(e)
        write()
    table["errors"] = errors
    print(write())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
