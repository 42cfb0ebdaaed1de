"""Admission and preemption under memory pressure, side by side in one run: the first paged engine's policy (admit
on the prompt's blocks alone, preempt the newest) against the lookahead reserve and the least-computed victim
(``serving.scheduler.Scheduler.admit``). CPU, the real engine over a tiny random Llama, a KV cache of
``--kv-blocks`` blocks, every request queued before the engine's loop starts (so the schedule, and every count,
is the same from run to run), max_tokens drawn from 16..128, ignore_eos. The load: log-normal prompt lengths
around instructionwild's median (98 tokens) of random ids, or ``--prompts`` (a file or folder), tokenized as on
the H200 (its checkpoint's toy BPE), which with ``--seeds 0 --max-num-seqs 4`` is that GPU bench's load itself.
Prints JSON (per policy, totals over the seeds: preemptions, recomputed tokens, engine steps, tokens/s,
served/failed, wall time) and writes it to ``--out``. Tokens/s on a shared CPU is noise next to the counts.

    python -m serving.bench_scheduler --seeds 0,1,2,3,4,5 --repeats 3 [--out FILE.json]
    python -m serving.bench_scheduler --prompts ../shared/data/instructionwild --seeds 0 --max-num-seqs 4
    python -m serving.bench_scheduler --policy old=0:newest --policy new=default --policy l32=32:least_computed

A policy is ``NAME=LOOKAHEAD_TOKENS:VICTIM`` (``EngineConfig.admission_lookahead_tokens`` /
``preemption_victim``) or ``NAME=default`` (the config's defaults). Every policy runs the same requests on the
same weights; ``outputs_equal_first`` counts the requests whose greedy tokens equal the first policy's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from typing import Any

DEFAULT_POLICIES = ("old=0:newest", "lookahead_only=8:newest", "victim_only=0:least_computed", "new=default")


def tiny_llama(vocab: int = 512, max_len: int = 1024, seed: int = 0, hidden: int = 64,
               layers: int = 2) -> tuple[Any, Any]:
    """A random Llama, by default at the tests' toy shape (hidden 64, 2 layers, 4 heads, 2 KV heads), and a
    word-level tokenizer over its ids (the prompts are token ids; nothing is detokenized)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"</s>": vocab - 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")),
                                  eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                      eos_token_id=vocab - 1, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


def workload(n: int, vocab: int, max_prompt: int, median: int, gen_min: int, gen_max: int,
             seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, max_tokens): prompt lengths log-normal with the given median (sigma 0.9: instructionwild's
    median 98 and its longest 984 are ten times apart, about 2.5 sigma), clipped to [4, max_prompt]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(max_prompt, max(4, round(median * math.exp(rng.gauss(0.0, 0.9)))))
        out.append(([rng.randrange(vocab - 1) for _ in range(length)], rng.randint(gen_min, gen_max)))
    return out


def toy_bpe_tokenizer() -> Any:
    """The byte-level BPE of ``../shared/tools/make_llama7b_gptq.py`` (300 asked for, 42 learned from its one
    training line): the tokenizer of the H200's LLaMA-7B-shaped GPTQ checkpoint, so ``--prompts`` gives the same
    token counts as ``python -m serving.bench --phases load`` there (48 instructionwild prompts: median 98, longest
    984)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator(["hello world benchmark text"] * 10,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def file_workload(source: str, n: int, vocab: int, gen_min: int, gen_max: int, seed: int = 0,
                  tokenizer: str | None = None) -> list[tuple[list[int], int]]:
    """``n`` prompts of ``source`` (loadtest's prompt loader, shuffled by ``seed``: 0 is the GPU bench's set),
    tokenized by ``tokenizer`` (a folder) or the H200 checkpoint's toy BPE, ids folded into the tiny model's
    vocabulary (lengths and shared prefixes are what the scheduler sees); max_tokens drawn as the GPU bench's
    load phase draws them (``random.Random(0).randint(gen_min, gen_max)`` per prompt)."""
    from loadtest.prompts import load_prompts

    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = toy_bpe_tokenizer()
    texts = [p.text for p in load_prompts(source, gen_max, limit=n, seed=seed)]
    rng = random.Random(0)
    return [([t % (vocab - 1) for t in tok(text)["input_ids"]], rng.randint(gen_min, gen_max)) for text in texts]


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition("=")
    if rest == "default":
        return name, {}
    look, _, victim = rest.partition(":")
    return name, {"admission_lookahead_tokens": int(look), "preemption_victim": victim or "newest"}


class _Steps:
    """Counts engine steps and running sequences per step (the listener hook the metrics use)."""

    def __init__(self) -> None:
        self.steps = self.running = self.peak = 0

    def on_admitted(self, seq: Any) -> None: ...
    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None: ...
    def on_preempted(self, seq: Any) -> None: ...
    def on_token(self, seq: Any, now: float) -> None: ...
    def on_finished(self, seq: Any) -> None: ...

    def on_step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.steps += 1
        self.running += running
        self.peak = max(self.peak, running)


def run_policy(model: Any, tok: Any, options: dict[str, Any], load: list[tuple[list[int], int]]) -> dict[str, Any]:
    """One engine over ``model`` with ``options``, every request of ``load`` sent at once; per-request tokens."""
    from serving.engine import EngineError, LLMEngine
    from serving.sampler import SamplingParams

    steps = _Steps()
    eng = LLMEngine.from_model(model, tok, options, stats=steps)
    eng.load()  # the requests are queued before the loop starts: its first step sees all of them (deterministic)
    done = threading.Event()
    lock = threading.Lock()
    tokens: list[list[int]] = [[] for _ in load]
    first: list[float | None] = [None] * len(load)
    errors: list[str | None] = [None] * len(load)
    left = [len(load)]

    def sink_for(i: int):
        def sink(o: Any) -> None:
            with lock:
                if isinstance(o, BaseException):
                    errors[i] = repr(o)[:120]
                else:
                    if first[i] is None:
                        first[i] = time.perf_counter()
                    tokens[i].extend(o.token_ids)
                    if o.finish_reason is None:
                        return
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        return sink

    try:
        for i, (ids, mt) in enumerate(load):
            params = SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True, detokenize=False)
            try:
                eng.add_request(ids, params, sink_for(i))
            except EngineError as e:  # a request the engine refuses counts as failed
                errors[i] = repr(e)[:120]
                left[0] -= 1
        t0 = time.perf_counter()
        eng.start()
        if left[0] and not done.wait(1800):
            raise RuntimeError("the load did not finish in 30 minutes")
        wall = time.perf_counter() - t0
        stats = eng.load_stats()
    finally:
        eng.shutdown()
    ok = [i for i in range(len(load)) if errors[i] is None and len(tokens[i]) == load[i][1]]
    total = sum(len(tokens[i]) for i in ok)
    ttft = sorted(first[i] - t0 for i in ok if first[i] is not None)
    return {
        "admission_lookahead_tokens": eng.opts.admission_lookahead_tokens,
        "preemption_victim": eng.opts.preemption_victim,
        "requests": len(load), "served": len(ok), "failed": len(load) - len(ok),
        "errors": sorted({e for e in errors if e}),
        "preemptions": stats["preemptions"], "recomputed_tokens": stats["recomputed_tokens"],
        "tokens": total, "wall_s": round(wall, 2), "tok_s": round(total / wall, 1),
        "engine_steps": steps.steps, "mean_running": round(steps.running / max(1, steps.steps), 2),
        "peak_running": steps.peak,
        "ttft_s_p50": round(ttft[len(ttft) // 2], 3) if ttft else None,
        "ttft_s_max": round(ttft[-1], 3) if ttft else None,
        "blocks_back": stats["free_blocks"] == stats["total_blocks"],
        "_tokens": tokens,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.bench_scheduler", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--kv-blocks", type=int, default=48, help="KV cache blocks (the H200 4 GB profile: 48 of 16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--median-prompt", type=int, default=98)
    p.add_argument("--gen-min", type=int, default=16)
    p.add_argument("--gen-max", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--prompts", help="prompt file or folder (e.g. ../shared/data/instructionwild) instead of "
                                     "log-normal random lengths; --seeds then shuffle it (0: the GPU bench's set)")
    p.add_argument("--tokenizer", help="with --prompts: tokenizer folder (default: the H200 checkpoint's toy BPE)")
    p.add_argument("--seeds", default="0,1,2,3", help="workloads (comma-separated seeds); totals over all of them")
    p.add_argument("--repeats", type=int, default=3, help="runs of each policy per workload, interleaved; the "
                                                          "median wall time counts (the CPU is shared)")
    p.add_argument("--hidden", type=int, default=64, help="model width (64: the tests' tiny Llama; wider makes a "
                                                          "recomputed token cost more next to a decode step)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine shares 2 cores)")
    p.add_argument("--policy", action="append", help=f"NAME=LOOKAHEAD:VICTIM or NAME=default (the config's "
                                                     f"defaults); default: {' '.join(DEFAULT_POLICIES)}")
    p.add_argument("--out", help="write the JSON here too")
    return p.parse_args(argv)


COUNTED = ("requests", "served", "failed", "preemptions", "recomputed_tokens", "tokens", "engine_steps")


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.kv_blocks * args.block_size
    model, tok = tiny_llama(max_len=max(1024, cache), hidden=args.hidden, layers=args.layers)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    policies = [parse_policy(spec) for spec in args.policy or DEFAULT_POLICIES]
    report: dict[str, Any] = {
        "machine": "cpu", "model": f"random Llama, hidden {args.hidden}, {args.layers} layers, fp32",
        "command": "python -m serving.bench_scheduler " + " ".join(sys.argv[1:] if argv is None else argv),
        "workload": {"requests_per_seed": args.requests, "seeds": seeds, "prompts": args.prompts or "log-normal",
                     "max_tokens": f"{args.gen_min}..{args.gen_max}", "all_at_once": True, "ignore_eos": True,
                     "prompt_tokens_median": [], "prompt_tokens_max": []},
        "kv_cache": {"blocks": args.kv_blocks, "block_size": args.block_size, "tokens": cache},
        "policies": {},
    }
    totals: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        if args.prompts:
            load = file_workload(args.prompts, args.requests, 512, args.gen_min, args.gen_max, seed, args.tokenizer)
        else:
            load = workload(args.requests, 512, cache - args.gen_max, args.median_prompt, args.gen_min,
                            args.gen_max, seed)
        lens = sorted(len(p) for p, _ in load)
        report["workload"]["prompt_tokens_median"].append(lens[len(lens) // 2])
        report["workload"]["prompt_tokens_max"].append(lens[-1])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in policies}
        for _ in range(max(1, args.repeats)):
            for name, opts in policies:
                options = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": cache,
                           "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
                           "max_waiting": 4 * len(load), "warmup": False, **opts}
                runs[name].append(run_policy(model, tok, options, load))
        reference = runs[policies[0][0]][0]["_tokens"]
        for name, rs in runs.items():
            r = sorted(rs, key=lambda x: x["wall_s"])[len(rs) // 2]
            t_counts = {(x["preemptions"], x["recomputed_tokens"], x["engine_steps"]) for x in rs}
            if len(t_counts) > 1:  # the schedule does not depend on timing: every repeat must count the same
                print(f"seed {seed} {name}: repeats differ {sorted(t_counts)}", file=sys.stderr)
            t = totals.setdefault(name, {"admission_lookahead_tokens": r["admission_lookahead_tokens"],
                                         "preemption_victim": r["preemption_victim"], "wall_s": 0.0,
                                         "outputs_equal_first": 0, "blocks_back": True, "errors": [],
                                         "mean_running": [], "peak_running": [], "ttft_s_p50": [],
                                         **dict.fromkeys(COUNTED, 0)})
            for k in COUNTED:
                t[k] += r[k]
            t["wall_s"] = round(t["wall_s"] + r["wall_s"], 2)
            t["outputs_equal_first"] += sum(a == b for a, b in zip(r["_tokens"], reference, strict=True))
            t["blocks_back"] &= all(x["blocks_back"] for x in rs)
            t["errors"] = sorted(set(t["errors"]) | set(r["errors"]))
            for k in ("mean_running", "peak_running", "ttft_s_p50"):
                t[k].append(r[k])
            print(f"seed {seed} {name}: " + json.dumps({k: v for k, v in r.items() if k != "_tokens"}),
                  file=sys.stderr, flush=True)
    for t in totals.values():
        t["tok_s"] = round(t["tokens"] / t["wall_s"], 1) if t["wall_s"] else None
    report["policies"] = totals
    names = list(totals)
    if len(names) >= 2:
        a, b = totals[names[0]], totals[names[-1]]
        report["summary"] = {
            "compared": [names[0], names[-1]],
            "preemptions": [a["preemptions"], b["preemptions"]],
            "recomputed_tokens": [a["recomputed_tokens"], b["recomputed_tokens"]],
            "engine_steps": [a["engine_steps"], b["engine_steps"]],
            "tok_s": [a["tok_s"], b["tok_s"]],
            "failed": [a["failed"], b["failed"]],
        }
    from serving.bench import emit_json

    emit_json(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
