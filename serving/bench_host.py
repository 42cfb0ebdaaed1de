"""Host time per decode step of the engine, with the model's forward left out: this checkout against a baseline
git revision, side by side in one run (each in its own process), as JSON.

    python -m serving.bench_host [--baseline REV | --baseline-src DIR] [--rows 8,16] [--new-tokens 128]
        [--reps 5] [--rounds 3] [--device cpu|cuda] [--shape tiny|1b] [--forward standin|real]
        [--out loadtest/results/cpu/host_step.json] [--profile]

What it measures: PPO/GRPO rollout requests (``detokenize=False, final_only=True``, one ``add_requests`` batch,
rows seeded ``seed + i`` at temperature 1 / top_p 1, and greedy), ``--rows`` rows of ``--new-tokens`` tokens each,
on a random Llama (``--shape``: tiny, or TinyLlama's 1.1B) in this process's engine. ``--forward standin`` (the
default) replaces the runner's ``decode`` by ``standin_decode``, which returns fixed random logits of the right
shape [rows, vocab], so a step's time is the engine's own work around the forward: scheduling, input packing and
copies, sampling, stop checks, bookkeeping; the stand-in's own time is subtracted. ``--forward real`` keeps the
forward and subtracts its time (on CUDA: CUDA events around each graph replay, so what is left is the host's
critical path plus the sampling kernels). Each scheduler iteration that decodes (the prefill one left out) is
timed from one iteration's start to the next; the figure is a rollout's median step, the fastest of ``--reps``
rollouts and ``--rounds`` turns (the versions take turns: other load on a shared machine only ever adds time, and
it moved single medians by up to 50% on the 2-core CI machine).

On a GPU the same work costs more per torch op (a kernel launch, a copy through the driver), so the CPU figure
ranks changes, it does not predict the GPU's microseconds. ``tokens_sha`` is a digest of every row's tokens:
equal digests across the two versions mean the change kept the outputs token for token.

The baseline's ``serving/`` and ``training/`` come from ``git archive REV`` into a temporary folder (or from
``--baseline-src``, where there is no git: ``git archive REV serving training | tar -x -C DIR`` beforehand); the
worker is this file, run with that folder first on ``PYTHONPATH``, so both versions run the same measurement.
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


SHAPES = {  # tiny: what CI runs; 1b: TinyLlama's shape (training.bench's 1.1B PPO bench)
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
}


_MODELS: dict[str, Any] = {}


class TimedGraph:
    """A captured decode graph whose every replay is bracketed by CUDA events (the forward's GPU time)."""

    def __init__(self, graph: Any, log: list):
        self.graph, self.log = graph, log

    def replay(self) -> None:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.graph.replay()
        end.record()
        self.log.append((start, end))


def _engine(rows: int, new_tokens: int, prompt_len: int, args: argparse.Namespace) -> tuple[Any, Any]:
    """A random Llama of ``--shape`` in an engine sized for one rollout (the options ``training.rollout`` sets).
    ``--forward standin``: the runner's decode replaced by ``standin_decode`` (fixed random logits; CUDA graphs
    off, they would capture the real forward); ``real``: the model's forward, timed apart (perf_counter on the CPU,
    CUDA events around each graph replay on CUDA). Returns the engine and a function giving the forward's seconds
    per decode step since the last call."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from serving.engine import LLMEngine

    cuda = args.device == "cuda"
    vocab = args.vocab if args.shape == "tiny" else 32000
    model = _MODELS.get(args.shape)
    if model is None:  # one per process: the 1.1B shape's random init is the slow part of a worker
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, eos_token_id=1, bos_token_id=0,
                          tie_word_embeddings=False, **SHAPES[args.shape])
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).eval()
        if cuda:
            model = model.to(torch.bfloat16)
        _MODELS[args.shape] = model
    max_len = prompt_len + new_tokens + 1
    graph_rows = sorted({b for b in (1, 2, 4, 8, 16, 24, 32) if b < rows} | {rows})
    opts = {"device": args.device, "kv_cache_tokens": rows * (-(-max_len // 16) * 16), "max_model_len": max_len,
            "block_size": 16, "enable_prefix_caching": False, "max_num_seqs": rows, "max_waiting": rows,
            "prefill_chunk": 8192, "max_prefill_tokens": 8192, "warmup": False, "gpu_memory_gb": None,
            "graph_batch_sizes": graph_rows, "cuda_graphs": cuda and args.forward == "real",
            "embed_on_host": False, "lm_head_int8": False, "fuse_projections": False,
            **({"overlap_decode": True} if args.overlap else {})}
    eng = LLMEngine.from_model(model, SimpleNamespace(eos_token_id=1), opts,
                               device=torch.device("cuda") if cuda else None)
    eng.load_and_start()
    eng.eos_ids = set()  # every row runs its full length (random weights, and the stand-in knows no EOS)
    spent: list[float] = []
    events: list = []
    if args.forward == "standin":
        g = torch.Generator().manual_seed(1)
        bank = (torch.randn(64, rows, vocab, generator=g) * 3).to(eng.device)

        def standin_decode(h, pos, slots, tables, lens, max_context):  # the runner's decode signature
            t = time.perf_counter()
            out = bank[int(pos[0]) % 64, :h.shape[0]] if not cuda else bank[0, :h.shape[0]]
            spent.append(time.perf_counter() - t)
            return out

        eng.runner.decode = standin_decode
    elif eng.graphs is not None:
        for k, (graph, out) in list(eng.graphs.graphs.items()):
            eng.graphs.graphs[k] = (TimedGraph(graph, events), out)
    else:
        decode = eng.runner.decode

        def timed_decode(*a):
            t = time.perf_counter()
            out = decode(*a)
            spent.append(time.perf_counter() - t)
            return out

        eng.runner.decode = timed_decode

    def forward_s() -> list[float]:
        if events:
            torch.cuda.synchronize()
            spent.extend(a.elapsed_time(b) / 1000 for a, b in events)
            events.clear()
        out = list(spent)
        spent.clear()
        return out

    return eng, forward_s


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


def worker(rows_list: list[int], args: argparse.Namespace) -> dict:
    import serving.engine

    new_tokens, reps, prompt_len = args.new_tokens, args.reps, args.prompt_len
    out: dict[str, Any] = {"serving": str(Path(serving.engine.__file__).resolve().parents[1])}
    for rows in rows_list:
        eng, forward_s = _engine(rows, new_tokens, prompt_len, args)
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
                forward_s()  # drop the warm-up's
                toks = _rollout(eng, rows, new_tokens, prompt_len, greedy, seed=1000 + 7919 * rep)
                end = time.perf_counter()
                digest.update(json.dumps(toks).encode())
                # iteration i runs from marks[i] to marks[i+1]
                steps = [b - a for a, b in zip(marks[1:], [*marks[2:], end], strict=True)]
                # one decode forward per iteration; the first iteration prefills, then decodes token 2 (left out)
                fwd = forward_s()[1:]
                if len(fwd) != len(steps):  # overlap_decode: a step queued ahead and computed again
                    fwd = [sum(fwd) / len(steps)] * len(steps)
                host = [a - b for a, b in zip(steps, fwd, strict=True)]
                per_rep.append((statistics.median(host), len(steps), statistics.median(steps),
                                statistics.median(fwd)))
            best = min(per_rep)
            out[f"rows{rows}_{mode}"] = {"host_us_per_step": round(best[0] * 1e6, 1),
                                         "step_us": round(best[2] * 1e6, 1),
                                         "forward_us_per_step": round(best[3] * 1e6, 1),
                                         "decode_steps": best[1], "reps": reps,
                                         "tokens_sha": digest.hexdigest()[:16]}
            if args.profile:
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
        if eng.graphs is not None:
            out["decode_graph_ms"] = eng.info.get("decode_graph_ms")
        eng.shutdown()
    return out


def _run_worker(src: Path, args: argparse.Namespace) -> dict:
    # ``src`` first; what was on the path stays after it (the GPU machine's wheels: tests/gpu/bench_host.sh)
    path = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    wargs = ["--worker", "--rows", args.rows, "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
             "--vocab", str(args.vocab), "--prompt-len", str(args.prompt_len), "--device", args.device, "--shape",
             args.shape, "--forward", args.forward] + (["--profile"] if args.profile else []) + (
                 ["--overlap"] if args.overlap else [])
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


def _git(*cmd: str) -> str:
    """A git answer about this checkout, or "" where there is no repository (a copied tree, the GPU machine)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--forward", choices=["standin", "real"], default="standin",
                    help="standin: decode replaced by fixed logits; real: the model's forward, its time subtracted")
    ap.add_argument("--overlap", action="store_true", help="engine.overlap_decode on (this checkout and baseline "
                                                            "alike: a baseline without it refuses the option)")
    ap.add_argument("--baseline-src", help="a folder holding the baseline's serving/ and training/ (no git needed)")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",")]
    if args.worker:
        print(json.dumps(worker(rows, args)))
        return 0
    import torch

    result: dict[str, Any] = {"what": "engine host microseconds per decode step, the forward replaced by a stand-in "
                                      "(standin_decode)", "machine": "cpu", "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "rows": rows, "new_tokens": args.new_tokens,
                              "prompt_len": args.prompt_len, "vocab": args.vocab if args.shape == "tiny" else 32000,
                              "device": args.device, "shape": args.shape, "forward": args.forward,
                              "overlap_decode": args.overlap}
    if args.device == "cuda":
        result["machine"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    if args.forward == "real":
        result["what"] = ("engine microseconds per decode step outside the model's forward (step minus the "
                          "forward's time: perf_counter on the CPU, CUDA events around each graph replay on CUDA)")
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "serving", "training")
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        if args.baseline:
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                                 capture_output=True, text=True, check=True).stdout.strip()
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "serving", "training"],
                                  capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
            sources[f"baseline {rev}"] = Path(tmp)
        if args.baseline_src:
            sources[f"baseline {args.baseline_src}"] = Path(args.baseline_src).resolve()
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
    from serving.bench import emit_json

    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
