"""Training benchmarks: step time, tokens/s, MFU and peak memory per stage and plugin; model capacity per plugin.

    python -m training.bench throughput --out DIR [--stages sft,rm,ppo] [--plugins ddp,zero2,gemini,3d]
                                        [--rollout-engines hf,serving]
    python -m training.bench capacity --out DIR [--plugins ddp,gemini] [--memory-gb 16]

``throughput`` builds a random Llama at a real shape (default: 1.1B, TinyLlama's shape), writes synthetic
full-length data, and runs the real stage CLIs (``python -m training.sft`` ...) with each plugin, reading
their ``metrics.jsonl``; the first steps (warm-up, kernel builds) are left out of the averages. PPO runs once per
rollout engine (``ppo.rollout_engine``: the HF loop, the serving engine), side by side with the seconds per step
of the rollout, the weight sync and the updates, and ``ppo_speedup`` (engine over HF loop, tokens/s and step time).
``capacity`` finds, for each plugin, the largest model of a 4096-wide Llama family (layers 2..32, 0.7B to
6.7B parameters) that trains (SFT steps, AdamW) within a GPU memory cap. Both print JSON and write it to
``--out``. Random weights: numbers for speed and memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

SHAPES: dict[str, dict[str, int]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "160m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4},
}
VOCAB = 32000
WORDS = 4000
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def make_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (one token per synthetic word) with ChatML specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(WORDS)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.save_pretrained(folder)


def make_model(folder: Path, shape: str) -> int:
    """Save a random Llama of ``shape`` (bf16 safetensors) with the tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        model_cfg = LlamaConfig.from_pretrained(folder)
    else:
        model_cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                                pad_token_id=0, eos_token_id=3, bos_token_id=2, **SHAPES[shape])
        torch.manual_seed(0)
        model = LlamaForCausalLM(model_cfg).to(torch.bfloat16)
        make_tokenizer(folder)
        model.save_pretrained(folder)
    h, i, n = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers
    kv = h * model_cfg.num_key_value_heads // model_cfg.num_attention_heads
    return 2 * VOCAB * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def make_data(folder: Path, seq: int, rows: int = 256) -> dict[str, Path]:
    """Full-length SFT conversations, preference pairs and prompts of synthetic words."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"sft": folder / "sft.jsonl", "pref": folder / "pref.jsonl", "prompts": folder / "prompts.jsonl"}
    with files["sft"].open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": _words(rng, seq // 8)},
                                             {"role": "assistant", "content": _words(rng, seq)}]}) + "\n")
    with files["pref"].open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"context": [{"from": "human", "content": _words(rng, seq // 4)}],
                                "chosen": [{"from": "assistant", "content": _words(rng, seq)}],
                                "rejected": [{"from": "assistant", "content": _words(rng, seq)}]}) + "\n")
    with files["prompts"].open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": _words(rng, seq // 4)}) + "\n")
    return files


def _plugin_train(plugin: str) -> dict[str, Any]:
    """``ddp+compile`` = ddp with torch.compile; ``3d`` = HybridParallel, tp over all local GPUs, ZeRO-1."""
    if plugin == "3d":
        import torch

        return {"plugin": "3d", "tp_size": max(1, torch.cuda.device_count()), "zero_stage": 1}
    if plugin == "ddp+compile":
        return {"plugin": "ddp", "compile": True}
    return {"plugin": plugin}


def stage_config(stage: str, plugin: str, model: Path, data: dict[str, Path], out: Path, *, seq: int, batch: int,
                 steps: int, rollout_engine: str = "hf") -> dict[str, Any]:
    train = {**_plugin_train(plugin), "precision": "bf16", "micro_batch_size": batch, "max_steps": steps,
             "lr": 1e-5, "warmup_steps": 0}
    cfg: dict[str, Any] = {"model": {"path": str(model)},
                           "data": {"train": [str(data["sft" if stage == "sft" else "pref"])], "max_length": seq,
                                    "eval_fraction": 0.0},
                           "train": train, "checkpoint": {"output_dir": str(out)},
                           "log": {"every": 1, "tensorboard": False, "progress": False}}
    if stage == "rm":
        cfg["train"]["micro_batch_size"] = max(1, batch // 2)
    if stage == "ppo":
        cfg["data"] = {"train": [str(data["prompts"])], "max_length": seq, "eval_fraction": 0.0}
        # "serving+compile": the engine with ppo.rollout_compile (its decode layer compiled); "+overlap":
        # ppo.rollout_overlap (the next decode step queued ahead); both: "serving+compile+overlap"; "+ptxjoint"
        # (any engine): ppo.ptx_pass=joint, the rollouts and PTX rows as one padded batch (the update before)
        engine_name, *variants = rollout_engine.split("+")
        engine_variants = set(variants) - {"ptxjoint"}
        if set(variants) - {"compile", "overlap", "ptxjoint"} or (engine_variants and engine_name != "serving"):
            raise ValueError(f"--rollout-engines: {rollout_engine!r} is not hf or serving, the serving engine "
                             "with +compile and/or +overlap, either with +ptxjoint")
        cfg["ppo"] = {"reward_model_path": str(model.parent / "rm"), "ptx_data": [str(data["sft"])], "ptx_coef": 0.1,
                      "rollout_batch_size": batch * 2, "ppo_epochs": 1, "rollout_engine": engine_name,
                      "rollout_compile": "compile" in variants, "rollout_overlap": "overlap" in variants,
                      **({"ptx_pass": "joint"} if "ptxjoint" in variants else {}),
                      "generation": {"max_new_tokens": 128, "temperature": 1.0}}
        cfg["train"]["micro_batch_size"] = batch
    return cfg


def summarize(metrics_path: Path, skip: int) -> dict[str, Any]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split", "train") == "train" and "tokens_per_s" in r]
    kept = rows[skip:] or rows[-1:]
    mean = lambda k: sum(r[k] for r in kept) / len(kept) if all(k in r for r in kept) else None  # noqa: E731
    out = {"steps_measured": len(kept), "step_time_s": mean("step_time_s"), "tokens_per_s": mean("tokens_per_s"),
           "mfu": mean("mfu"), "peak_mem_gib": max(r["peak_mem_gib"] for r in rows)}
    for k in ("rollout_s", "sync_s", "update_s", "response_length"):  # PPO's phases (training.rollout.PhaseTimes)
        if mean(k) is not None:
            out[k] = mean(k)
    return out


def ppo_speedup(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per plugin: the serving engine's PPO tokens/s and step time over the HF loop's."""
    by = {(r["plugin"], r.get("rollout_engine")): r for r in runs if r["stage"] == "ppo" and r.get("tokens_per_s")}
    out = {}
    for (plugin, eng), r in by.items():
        hf = by.get((plugin, "hf"))
        if eng is not None and eng.startswith("serving") and hf is not None:
            out[plugin if eng == "serving" else f"{plugin}/{eng}"] = {
                "tokens_per_s": round(r["tokens_per_s"] / hf["tokens_per_s"], 2),
                "step_time": round(hf["step_time_s"] / r["step_time_s"], 2),
                **({"rollout_time": round(hf["rollout_s"] / r["rollout_s"], 2)}
                   if hf.get("rollout_s") and r.get("rollout_s") else {})}
    return out


def _run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _tail(log: Path, n: int = 12) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.out)
    model = work / "model"
    model.mkdir(parents=True, exist_ok=True)
    n_params = make_model(model, args.shape)
    data = make_data(work / "data", args.seq)
    results: dict[str, Any] = {"shape": args.shape, "params": n_params, "seq": args.seq, "batch": args.batch,
                               "runs": []}
    jobs = [(stage, plugin, eng) for stage in args.stages.split(",") for plugin in args.plugins.split(",")
            for eng in (args.rollout_engines.split(",") if stage == "ppo" else [None])]
    for stage, plugin, eng in jobs:
        name = f"{stage}-{plugin}" + (f"-{eng}" if eng else "")
        unreadable = plugin == "gemini" or plugin == "3d" and _plugin_train(plugin)["tp_size"] > 1
        if eng and eng.startswith("serving") and unreadable:
            run = {"stage": stage, "plugin": plugin, "rollout_engine": eng,
                   "skipped": "the engine cannot read this plugin's parameters (training.rollout.check_plugin)"}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            continue
        out = work / "runs" / name
        cfg = stage_config(stage, plugin, model, data, out, seq=args.seq, batch=args.batch, steps=args.steps,
                           rollout_engine=eng or "hf")
        cfg_path = work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        if stage == "ppo" and not (work / "rm").exists():  # reward model and critic: a value head on the model
            (work / "rm").symlink_to(model.resolve())
        log = work / f"{name}.log"
        nproc = cfg["train"].get("tp_size", 1)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
            if nproc > 1 else [sys.executable]
        rc, wall = _run([*launcher, "-m", f"training.{stage}", "--config", str(cfg_path)], log, args.timeout)
        run: dict[str, Any] = {"stage": stage, "plugin": plugin, "rc": rc, "wall_s": round(wall, 1)}
        if eng:
            run["rollout_engine"] = eng
        if (out / "metrics.jsonl").exists():
            run.update(summarize(out / "metrics.jsonl", args.skip))
        if rc != 0:
            run["error"] = _tail(log)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        results["ppo_speedup"] = ppo_speedup(results["runs"])
        _write(work / "throughput.json", results)
    return results


def layers_params(layers: int) -> int:
    h, i = 4096, 11008
    return 2 * VOCAB * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h


def probe(args: argparse.Namespace) -> int:
    """One capacity attempt in a fresh process: exit 0 if a few SFT steps fit, 3 on out-of-memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training import engine
    from training.config import TrainConfig

    cfg = TrainConfig(**_plugin_train(args.plugin), precision="bf16", micro_batch_size=args.batch,
                      gpu_memory_limit_gb=args.memory_gb, gemini_offload_fraction=1.0 if args.offload else 0.0,
                      gemini_offload_param_fraction=1.0 if args.offload else 0.0)
    device = engine.init_distributed(cfg)
    model_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=32,
                            tie_word_embeddings=False, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # a random row repeated: fast to fill, values irrelevant to memory
        for p in model.parameters():
            p.copy_(torch.randn(p.shape[-1]) * 0.02) if p.dim() > 1 else p.fill_(1.0)
    try:
        t = engine.boost("model", model, cfg, lr=1e-5, total_steps=10, device=device)
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
        for _ in range(2):
            with engine.autocast(cfg, device):
                loss = t.model(input_ids=ids, labels=ids).loss
            t.backward(loss)
            t.step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        print(f"OOM: {str(e)[:300]}", flush=True)
        return 3
    print(json.dumps({"ok": True, "loss": loss.item(), "peak_mem_gib": engine.peak_memory_gib(device)}), flush=True)
    return 0


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"memory_cap_gib": args.memory_gb, "seq": args.seq, "batch": args.batch,
                               "family": "Llama hidden 4096, intermediate 11008, vocab 32000", "plugins": {}}
    for plugin in args.plugins.split(","):
        tried = []
        for layers in [int(x) for x in args.layers.split(",")]:
            log = work / f"probe-{plugin}-{layers}.log"
            cmd = [sys.executable, "-m", "training.bench", "probe", "--plugin", plugin, "--layers", str(layers),
                   "--memory-gb", str(args.memory_gb), "--seq", str(args.seq), "--batch", str(args.batch)]
            if plugin == "gemini" and args.offload:
                cmd.append("--offload")
            rc, wall = _run(cmd, log, args.timeout)
            attempt = {"layers": layers, "params": layers_params(layers), "fits": rc == 0, "rc": rc,
                       "wall_s": round(wall, 1)}
            if rc not in (0, 3):
                attempt["error"] = _tail(log, 6)
            tried.append(attempt)
            print(json.dumps({"plugin": plugin, **attempt}), flush=True)
            if rc != 0:
                break
        fits = [a["params"] for a in tried if a["fits"]]
        results["plugins"][plugin] = {"largest_params": max(fits) if fits else 0, "attempts": tried}
        _write(work / "capacity.json", results)
    sizes = {p: r["largest_params"] for p, r in results["plugins"].items()}
    if sizes.get("ddp") and sizes.get("gemini"):
        results["gemini_over_ddp"] = round(sizes["gemini"] / sizes["ddp"], 2)
    _write(work / "capacity.json", results)
    return results


def _write(path: Path, obj: Any) -> None:
    from training.artifacts import atomic_write_json

    atomic_write_json(path, obj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tp = sub.add_parser("throughput", help="step time, tokens/s, MFU, peak memory per stage and plugin")
    tp.add_argument("--out", required=True)
    tp.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    tp.add_argument("--stages", default="sft,rm,ppo")
    tp.add_argument("--plugins", default="ddp,zero2,gemini,3d")
    tp.add_argument("--rollout-engines", default="hf,serving",
                    help="PPO's ppo.rollout_engine values to compare; serving+compile adds ppo.rollout_compile, "
                         "+overlap ppo.rollout_overlap")
    tp.add_argument("--seq", type=int, default=1024)
    tp.add_argument("--batch", type=int, default=8)
    tp.add_argument("--steps", type=int, default=8)
    tp.add_argument("--skip", type=int, default=3, help="leading steps left out of the averages")
    tp.add_argument("--timeout", type=int, default=400)
    cp = sub.add_parser("capacity", help="largest model that trains within a GPU memory cap, per plugin")
    cp.add_argument("--out", required=True)
    cp.add_argument("--plugins", default="ddp,gemini")
    cp.add_argument("--layers", default="2,4,8,16,24,32")
    cp.add_argument("--memory-gb", type=float, default=16.0)
    cp.add_argument("--seq", type=int, default=512)
    cp.add_argument("--batch", type=int, default=2)
    cp.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                    help="gemini keeps fp32 master weights and optimizer state in CPU memory")
    cp.add_argument("--timeout", type=int, default=300)
    pr = sub.add_parser("probe")
    pr.add_argument("--plugin", required=True)
    pr.add_argument("--layers", type=int, required=True)
    pr.add_argument("--memory-gb", type=float, required=True)
    pr.add_argument("--seq", type=int, default=512)
    pr.add_argument("--batch", type=int, default=2)
    pr.add_argument("--offload", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "probe":
        return probe(args)
    result = throughput(args) if args.cmd == "throughput" else capacity(args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
