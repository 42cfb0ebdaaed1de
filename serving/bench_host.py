"""Host time per decode step of the engine, with the model's forward left out: this checkout against a baseline
git revision, side by side in one run (each in its own process), as JSON.

    python -m serving.bench_host [--baseline REV] [--rows 8,16] [--new-tokens 128] [--reps 5] [--rounds 3]
                                 [--out loadtest/results/cpu/host_step.json] [--profile]

What it measures: PPO/GRPO rollout requests (``detokenize=False, final_only=True``, one ``add_requests`` batch,
rows seeded ``seed + i`` at temperature 1 / top_p 1, and greedy), ``--rows`` rows of ``--new-tokens`` tokens each,
on a tiny random Llama in this process's engine on the CPU. The runner's ``decode`` is replaced by a stand-in
(``standin_decode``) that returns fixed random logits of the right shape [rows, vocab], so a step's time is the
engine's own work around the forward: scheduling, input packing and copies, sampling, stop checks, bookkeeping.
The stand-in's own time is measured and subtracted. Each scheduler iteration that decodes (the prefill one left
out) is timed from one iteration's start to the next; the figure is a rollout's median step, the fastest of
``--reps`` rollouts and ``--rounds`` turns (the versions take turns: other load on a shared machine only ever adds
time, and it moved single medians by up to 50% on the 2-core CI machine).

On a GPU the same work costs more per torch op (a kernel launch, a copy through the driver), so the CPU figure
ranks changes, it does not predict the GPU's microseconds. ``tokens_sha`` is a digest of every row's tokens:
equal digests across the two versions mean the change kept the outputs token for token.

The baseline's ``serving/`` and ``training/`` come from ``git archive REV`` into a temporary folder; the worker
is this file, run with that folder first on ``PYTHONPATH``, so both versions run the same measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _tiny_engine(rows: int, new_tokens: int, vocab: int, prompt_len: int) -> tuple[Any, dict[str, float]]:
    """A random 2-layer Llama (hidden 64) in an engine sized for one rollout, decode replaced by the stand-in."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from serving.engine import LLMEngine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=1,
                      bos_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    max_len = prompt_len + new_tokens + 1
    opts = {"device": "cpu", "kv_cache_tokens": rows * (-(-max_len // 16) * 16), "max_model_len": max_len,
            "block_size": 16, "enable_prefix_caching": False, "max_num_seqs": rows, "max_waiting": rows,
            "prefill_chunk": 4096, "max_prefill_tokens": 4096, "warmup": False}
    eng = LLMEngine.from_model(model, SimpleNamespace(eos_token_id=1), opts)
    eng.load_and_start()
    eng.eos_ids = set()  # every row runs its full length (the stand-in's logits know nothing of EOS)
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(64, rows, vocab, generator=g) * 3
    spent = {"s": 0.0}

    def standin_decode(h, pos, slots, tables, lens, max_context):  # the runner's decode signature
        t = time.perf_counter()
        out = bank[int(pos[0]) % 64, :h.shape[0]]
        spent["s"] += time.perf_counter() - t
        return out

    eng.runner.decode = standin_decode
    return eng, spent


def _rollout(eng: Any, rows: int, new_tokens: int, prompt_len: int, greedy: bool, seed: int) -> list[list[int]]:
    from serving.sampler import SamplingParams

    done = threading.Event()
    left = [rows]

    def sink(out: Any) -> None:
        if isinstance(out, BaseException) or out.finish_reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0 if greedy else 1.0, top_p=1.0,
                             seed=None if greedy else seed + i, detokenize=False, final_only=True)
              for i in range(rows)]
    prompts = [[3 + (i * 7 + j) % 50 for j in range(prompt_len - i % 4)] for i in range(rows)]
    seqs = eng.add_requests(prompts, params, sink)
    if not done.wait(300):
        raise RuntimeError("rollout did not finish")
    return [list(s.output_ids) for s in seqs]


def worker(rows_list: list[int], new_tokens: int, reps: int, vocab: int, prompt_len: int, profile: bool) -> dict:
    import serving.engine

    out: dict[str, Any] = {"serving": str(Path(serving.engine.__file__).resolve().parents[1])}
    for rows in rows_list:
        eng, spent = _tiny_engine(rows, new_tokens, vocab, prompt_len)
        inner = eng._step
        marks: list[float] = []

        def timed_step(inner=inner, marks=marks) -> None:
            marks.append(time.perf_counter())
            inner()

        eng._step = timed_step
        for mode in ("sampled", "greedy"):
            greedy = mode == "greedy"
            _rollout(eng, rows, new_tokens, prompt_len, greedy, seed=1000)  # warm-up
            per_rep, digest = [], hashlib.sha256()
            for rep in range(reps):
                marks.clear()
                spent["s"] = 0.0
                toks = _rollout(eng, rows, new_tokens, prompt_len, greedy, seed=1000 + 7919 * rep)
                end = time.perf_counter()
                digest.update(json.dumps(toks).encode())
                # iteration i runs from marks[i] to marks[i+1]; the first one prefills (and samples token 1)
                steps = [b - a for a, b in zip(marks[1:], [*marks[2:], end], strict=True)]
                steps = steps[:new_tokens - 1]
                per_rep.append((statistics.median(steps), len(steps), spent["s"] / max(len(steps), 1)))
            med = min(r[0] - r[2] for r in per_rep)
            out[f"rows{rows}_{mode}"] = {"host_us_per_step": round(med * 1e6, 1),
                                         "standin_us_per_step": round(statistics.median(r[2] for r in per_rep) * 1e6,
                                                                      1),
                                         "decode_steps": per_rep[0][1], "reps": reps,
                                         "tokens_sha": digest.hexdigest()[:16]}
            if profile:
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                eng._step = lambda prof=prof, inner=inner: prof.runcall(inner)
                _rollout(eng, rows, new_tokens, prompt_len, greedy, seed=1000)
                eng._step = timed_step
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumtime").print_stats(25)
                print(f"--- profile rows={rows} {mode}\n{buf.getvalue()}", file=sys.stderr)
        eng.shutdown()
    return out


def _run_worker(src: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "TOKENIZERS_PARALLELISM": "false"}
    wargs = ["--worker", "--rows", args.rows, "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
             "--vocab", str(args.vocab), "--prompt-len", str(args.prompt_len)] + (["--profile"] if args.profile else [])
    # this file run by path with ``src`` (cwd) first on sys.path: the version under test is whatever ``src`` holds
    boot = (f"import runpy, sys; sys.argv = {[__file__, *wargs]!r}; "
            f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')")
    cmd = [sys.executable, "-c", boot]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=1800)
    if proc.stderr and (args.profile or proc.returncode):
        print(proc.stderr[-20000:], file=sys.stderr)
    if proc.returncode:
        raise RuntimeError(f"worker for {src} exited {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="git revision to compare with (its serving/ and training/)")
    ap.add_argument("--rows", default="8,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=512, help="small: the CPU's softmax over it stays negligible")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="turns per version (the fastest is kept)")
    ap.add_argument("--profile", action="store_true", help="cProfile of one rollout per case, on stderr")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",")]
    if args.worker:
        print(json.dumps(worker(rows, args.new_tokens, args.reps, args.vocab, args.prompt_len, args.profile)))
        return 0
    import torch

    result: dict[str, Any] = {"what": "engine host microseconds per decode step, the forward replaced by a stand-in "
                                      "(standin_decode)", "machine": "cpu", "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "rows": rows, "new_tokens": args.new_tokens,
                              "prompt_len": args.prompt_len, "vocab": args.vocab}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "serving", "training"],
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        if args.baseline:
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                                 capture_output=True, text=True, check=True).stdout.strip()
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "serving", "training"],
                                  capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
            sources[f"baseline {rev}"] = Path(tmp)
        sources[f"this checkout {head}{' +changes' if dirty else ''}"] = ROOT
        # the versions take turns, ``--rounds`` times, and each case keeps its fastest round: the 2 shared cores
        # of the CI machine are loaded by other work, which only ever adds time
        versions: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, src in sources.items():
                got = _run_worker(src, args)
                best = versions.setdefault(name, got)
                for k, v in got.items():
                    if isinstance(v, dict) and v["host_us_per_step"] < best[k]["host_us_per_step"]:
                        best[k] = v
    result["rounds"] = args.rounds
    result["versions"] = versions
    if len(versions) == 2:
        (_, a), (_, b) = versions.items()
        result["after_vs_before"] = {
            k: {"before_us": a[k]["host_us_per_step"], "after_us": b[k]["host_us_per_step"],
                "cut_pct": round(100 * (1 - b[k]["host_us_per_step"] / a[k]["host_us_per_step"]), 1),
                "same_tokens": a[k]["tokens_sha"] == b[k]["tokens_sha"]}
            for k in b if k in a and isinstance(b[k], dict)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
