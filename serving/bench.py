"""Engine benchmark: tokens/s and latency at batch 1..N, next to Hugging Face ``generate`` on the same model.

    python -m serving.bench --model PATH [--gpu-memory-gb 4] [--batch-sizes 1,2,4] [--prompt-len 128]
                            [--gen-len 128] [--kv-cache-dtype int8] [--max-model-len 512] [--out FILE.json]

Each phase runs in its own process (clean ``nvidia-smi`` readings, no cache left over from another phase):
``engine`` (this project's engine), ``generate`` (HF ``generate``, what ColossalChat's inference did) and,
with ``--hf-continuous-batching``, transformers' own ``generate_batch``. All phases run under the same
``torch.cuda.set_per_process_memory_fraction`` cap. Prints one JSON document (and writes it to ``--out``).
Weights are whatever the checkpoint holds: random weights are honest for speed and memory, not quality.
No Ray, FastAPI or pydantic needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 1024**3


def emit_json(obj: Any, out: str | os.PathLike | None, indent: int = 2, default: Any = None) -> str:
    """The benchmarks' result: printed as JSON on stdout and, with ``out``, written there atomically (a temporary
    file renamed into place, parents made), so a run cut short never leaves a half-written result."""
    text = json.dumps(obj, indent=indent, default=default)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    return text


def _smi_sampler(stop: threading.Event, out: dict[str, int]) -> None:
    """Poll nvidia-smi for this process's (or the GPU's) used memory in MiB; keep the maximum."""
    from serving.memory import compute_apps_mib

    pid = os.getpid()
    while not stop.is_set():
        try:
            apps = compute_apps_mib()
            if apps is None:
                return
            if pid in apps:
                out["process_mib"] = max(out.get("process_mib", 0), apps[pid])
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10).stdout.split()
            if used:
                out["gpu_used_mib"] = max(out.get("gpu_used_mib", 0), int(used[0]))
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        stop.wait(0.25)


def measure_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), 512 MiB buffers."""
    import torch

    n = 512 * 1024**2
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * reps / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


def _cap(gb: float | None) -> None:
    import torch

    if torch.cuda.is_available() and gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * GIB / total))


def _prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 10), (batch, length), generator=g).tolist()


def _engine_options(args: argparse.Namespace, cuda: bool, legacy: bool = False, **overrides: Any) -> Any:
    """The engine's options from the command line (one place for every phase that runs an engine). ``legacy``:
    the fixed-slot engine of ``serving.bench_legacy`` (slots of ``--max-model-len``); otherwise the paged engine
    (``--paged-max-model-len``, 0 = the model's own length limited by the budget)."""
    base = dict(device="cuda" if cuda else "cpu", gpu_memory_gb=args.gpu_memory_gb,
                kv_cache_dtype=args.kv_cache_dtype, embed_on_host=args.embed_on_host, lm_head_int8=args.lm_head_int8,
                cuda_graphs=not args.no_cuda_graphs, compile=args.compile, fuse_projections=args.fuse_projections,
                gptq_backend=args.gptq_backend, prefill_chunk=args.prefill_chunk)
    if legacy:
        from serving.bench_legacy.engine import EngineOptions as LegacyOptions

        return LegacyOptions(**{**base, "max_model_len": args.max_model_len, **overrides})
    from serving.engine import EngineOptions

    base.update(max_model_len=args.paged_max_model_len or None, block_size=args.block_size,
                cuda_stack_limit=args.cuda_stack_limit or None, vendor_blas=getattr(args, "vendor_blas", True),
                lm_head_int4=getattr(args, "lm_head_int4", False))
    return EngineOptions(**{**base, **overrides})


def _make_engine(args: argparse.Namespace, cuda: bool, legacy: bool, stats: Any = None, **overrides: Any) -> Any:
    if legacy:
        from serving.bench_legacy.engine import LLMEngine as Legacy
        from serving.memory import set_alloc_conf

        set_alloc_conf()  # the fixed-slot engine set this at import; here before CUDA starts, as it did
        return Legacy(args.model, _engine_options(args, cuda, True, **overrides))
    from serving.engine import LLMEngine

    return LLMEngine(args.model, _engine_options(args, cuda, False, **overrides), stats=stats)


def _prefix_hit_listener() -> Any:
    """A StatsListener that keeps the prompt tokens the prefix cache supplied, admission by admission."""
    from serving.scheduler import StatsListener

    class Hits(StatsListener):
        def __init__(self) -> None:
            self.hits: list[int] = []

        def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
            self.hits.append(hit_tokens)

    return Hits()


class _Smi:
    """nvidia-smi polled in a thread over a whole phase (the process's MiB and the GPU's), maximum kept."""

    def __init__(self, cuda: bool):
        self.stop, self.out = threading.Event(), {}
        self.thread = threading.Thread(target=_smi_sampler, args=(self.stop, self.out), daemon=True)
        if cuda:
            self.thread.start()

    def result(self) -> dict[str, int]:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        return self.out


def _capacity(eng: Any) -> int:
    """Concurrent sequences an engine runs: the fixed-slot engine's slots, the paged engine's max_num_seqs."""
    return eng.num_slots


def phase_engine(args: argparse.Namespace, compile_decode: bool | None = None, legacy: bool = False
                 ) -> dict[str, Any]:
    import torch

    from serving.sampler import SamplingParams

    cuda = torch.cuda.is_available() and args.device != "cpu"
    result: dict[str, Any] = {}
    smi = _Smi(cuda)
    if cuda and (legacy or not args.cuda_stack_limit):
        # before the engine: its 1 GiB of buffers would not fit under the engine's cap. The paged engine with a
        # stack limit must be the first to start CUDA, so there it is left to the generate phase.
        result["bandwidth_gbps"] = round(measure_bandwidth() / 1e9, 1)
    eng = _make_engine(args, cuda, legacy, max_num_seqs=max(args.batch_sizes), warmup=True, max_waiting=1024,
                       compile=args.compile if compile_decode is None else compile_decode)
    eng.load_and_start()
    result["engine"] = eng.info
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    vocab = eng.runner.vocab
    runs = []
    cap = _capacity(eng)
    sizes = sorted(set(args.batch_sizes) | ({cap} if cap < max(args.batch_sizes) else set()))
    for b in sizes:  # the budget's own maximum is always measured
        if b > cap:
            runs.append({"batch": b, "skipped": f"budget holds {cap} concurrent sequences"})
            continue
        runs.append(_engine_run(eng, SamplingParams, _prompts(vocab, b, args.prompt_len, seed=b), args.gen_len))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    if not legacy:
        # the cache holding its most: one sequence as long as max_model_len (prompt + 32 new tokens)
        gen = min(32, eng.max_model_len // 2)
        fill = _engine_run(eng, SamplingParams, _prompts(vocab, 1, eng.max_model_len - gen, seed=99), gen)
        result["full_length_run"] = {**fill, "cached_tokens_held": eng.max_model_len}
        result["memory_report"] = eng.memory_report()
    if cuda:
        torch.cuda.synchronize()
        result["peak_allocated_serving_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20)
        wbytes = eng.info["weights_bytes_on_gpu"]
        if result.get("bandwidth_gbps"):
            result["bandwidth_limit_tok_s"] = round(result["bandwidth_gbps"] * 1e9 / wbytes, 1)
    result["nvidia_smi_max"] = smi.result()
    result["runs"] = runs
    result["max_concurrency"] = cap
    result["kv_cache_tokens"] = eng.info.get("kv_cache_tokens", eng.info.get("num_slots", 0) * eng.max_model_len)
    result["max_model_len"] = eng.max_model_len
    eng.shutdown()
    return result


def _stream_one(eng: Any, params: Any, ids: list[int]) -> dict[str, Any]:
    """One request through ``add_request``, timed: ttft, tokens, error."""
    done, out = threading.Event(), {"tokens": 0}
    t0 = time.perf_counter()

    def sink(o: Any) -> None:
        if isinstance(o, BaseException):
            out["error"] = f"{type(o).__name__}: {str(o)[:200]}"
            done.set()
            return
        out.setdefault("ttft_s", time.perf_counter() - t0)
        out["tokens"] = o.completion_tokens
        out.setdefault("ids", []).extend(o.token_ids)
        if o.finish_reason:
            out["e2e_s"] = time.perf_counter() - t0
            done.set()

    try:
        eng.add_request(ids, params, sink)
    except Exception as e:  # noqa: BLE001 - an admission error is this request's result
        return {"tokens": 0, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    done.wait(1800)
    return out


def phase_chat(args: argparse.Namespace, prefix_caching: bool = True, legacy: bool = False) -> dict[str, Any]:
    """A 10-turn chat whose history grows to what the cache holds: each turn sends the whole history plus a new
    user message and streams ``turn_gen`` tokens; TTFT per turn. ``--chat-system N``: the history starts with an
    N-token system prompt (OpenWebUI, agents and LangChain chains send one), the same in every turn."""
    import torch

    from serving.sampler import SamplingParams

    cuda = torch.cuda.is_available() and args.device != "cpu"
    smi = _Smi(cuda)
    kw = {} if legacy else {"enable_prefix_caching": prefix_caching, "stats": _prefix_hit_listener()}
    eng = _make_engine(args, cuda, legacy, max_num_seqs=2, warmup=True, **kw)
    eng.load_and_start()
    # the conversation reaches what the paged engine holds; the main process passes the chat phase's length on
    # to the later chat phases so that the fixed-slot engine gets the same conversation
    length = args.paged_chat_len or eng.max_model_len
    system = min(args.chat_system, length // 2)
    per_turn = (length - system) // args.turns
    gen = min(args.turn_gen, per_turn // 2)
    user = per_turn - gen
    vocab = eng.runner.vocab
    history: list[int] = _prompts(vocab, 1, system, seed=999)[0] if system else []
    turns = []
    hits = kw.get("stats")
    for t in range(args.turns):
        history += _prompts(vocab, 1, user, seed=1000 + t)[0]
        seen = len(hits.hits) if hits else 0
        r = _stream_one(eng, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True), list(history))
        # the prompt tokens the prefix cache supplied at this turn's admission (measured, not computed)
        cached = hits.hits[seen] if hits and len(hits.hits) > seen else 0
        turns.append({"turn": t + 1, "prompt_tokens": len(history), "cached_tokens": cached,
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "ids"}})
        print(json.dumps(turns[-1]), file=sys.stderr, flush=True)
        if "error" in r:
            break
        history += r["ids"]
    out = {"turns": turns, "chat_tokens": length, "system_tokens": system, "turn_gen": gen,
           "prefix_caching": prefix_caching and not legacy,
           "engine": {k: eng.info.get(k) for k in ("kv_cache_tokens", "max_model_len", "num_slots", "block_size")},
           "nvidia_smi_max": smi.result()}
    eng.shutdown()
    return out


def _uncached_share(turn: dict[str, Any]) -> float | None:
    """The share of a chat turn's prompt that a prefix cache cannot supply (the floor of its TTFT ratio when
    prefill time is proportional to the tokens computed)."""
    n = turn.get("prompt_tokens")
    return round(1 - turn.get("cached_tokens", 0) / n, 3) if n else None


def phase_load(args: argparse.Namespace, legacy: bool = False, **policy: Any) -> dict[str, Any]:
    """Mixed-length load in-process: ``--load-requests`` prompts (``--prompts``, e.g. ../shared/data/instructionwild,
    else random lengths), max_tokens drawn from 16..``--gen-len``, all arriving at once (the engine queues them).
    Per-request success is kept in order so the summary can compare engines request by request. ``policy``: paged
    engine options (``load_prompt_admission``: the first paged engine's admission and preemption)."""
    import random

    import torch

    from serving.sampler import SamplingParams

    cuda = torch.cuda.is_available() and args.device != "cpu"
    smi = _Smi(cuda)
    eng = _make_engine(args, cuda, legacy, max_num_seqs=max(args.batch_sizes), warmup=True, max_waiting=4096,
                       **policy)
    eng.load_and_start()
    rng = random.Random(0)
    n = args.load_requests
    if args.prompts:
        from loadtest.prompts import load_prompts

        texts = [p.text for p in load_prompts(args.prompts, args.gen_len, limit=n)]
        prompts = [eng.tokenizer(t)["input_ids"] for t in texts]
    else:
        prompts = [_prompts(eng.runner.vocab, 1, rng.randint(8, 512), seed=i)[0] for i in range(n)]
    max_tokens = [rng.randint(16, args.gen_len) for _ in prompts]
    results: list[dict[str, Any]] = [{} for _ in prompts]
    threads = []
    t0 = time.perf_counter()
    for i, (ids, mt) in enumerate(zip(prompts, max_tokens, strict=True)):
        params = SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True)
        th = threading.Thread(target=lambda i=i, ids=ids, p=params: results.__setitem__(i, _stream_one(eng, p, ids)))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft_s"] for r in ok if "ttft_s" in r)
    out = {"requests": len(prompts), "ok": [("error" not in r) for r in results], "served": len(ok),
           "failed": len(prompts) - len(ok), "errors": sorted({r["error"][:80] for r in results if "error" in r}),
           "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
           "aggregate_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
           "prompt_tokens_median": sorted(len(p) for p in prompts)[len(prompts) // 2],
           "prompt_tokens_max": max(len(p) for p in prompts),
           "ttft_s_p50": round(ttft[len(ttft) // 2], 3) if ttft else None,
           "ttft_s_p99": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))], 3) if ttft else None,
           "preemptions": eng.load_stats().get("preemptions"),
           "recomputed_tokens": eng.load_stats().get("recomputed_tokens"),
           "admission": [getattr(eng.opts, "admission_lookahead_tokens", None),
                         getattr(eng.opts, "preemption_victim", None)], "nvidia_smi_max": smi.result()}
    eng.shutdown()
    return out


def _engine_run(eng: Any, sampling_cls: Any, prompts: list[list[int]], gen_len: int) -> dict[str, Any]:
    done = threading.Event()
    lock = threading.Lock()
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    counts: dict[int, int] = {}
    remaining = [len(prompts)]
    errors: list[str] = []

    def make_sink(i: int):
        def sink(o: Any) -> None:
            now = time.perf_counter()
            with lock:
                if isinstance(o, BaseException):
                    errors.append(repr(o))
                    done.set()
                    return
                first.setdefault(i, now)
                last[i] = now
                counts[i] = o.completion_tokens
                if o.finish_reason:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
        return sink

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(p, sampling_cls(max_tokens=gen_len, temperature=0.0, ignore_eos=True), make_sink(i))
    if not done.wait(1800):
        raise RuntimeError("benchmark run did not finish")
    if errors:
        return {"batch": len(prompts), "error": errors[0]}
    wall = time.perf_counter() - t0
    total = sum(counts.values())
    ttft = sorted(first[i] - t0 for i in first)
    decode = [(counts[i] - 1) / (last[i] - first[i]) for i in counts if last[i] > first[i]]
    return {"batch": len(prompts), "prompt_len": len(prompts[0]), "gen_len": gen_len, "wall_s": round(wall, 3),
            "tokens": total, "aggregate_tok_s": round(total / wall, 1),
            "per_stream_decode_tok_s": round(sum(decode) / max(1, len(decode)), 1),
            "ttft_s_median": round(ttft[len(ttft) // 2], 4), "ttft_s_max": round(ttft[-1], 4)}


KERNEL_GROUPS = (("gptq_gemm", ("marlin", "gptq", "exllama", "dequant", "w4a16")), ("compiled", ("triton",)),
                 ("cublas_gemm", ("gemm", "gemv", "cublas", "cutlass", "sm90_", "sm80_")),
                 ("attention", ("flash", "fmha", "attention", "softmax")), ("copy_fill", ("copy", "fill", "memset",
                                                                                         "memcpy", "cat")))


def _kernel_group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def phase_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Where a decode step's time goes, at each of ``--batch-sizes``: ``torch.profiler`` over decode steps run
    eagerly (no CUDA graphs; ``--compile`` as given), device kernels (CPU: operators) grouped by kind, with the top
    kernels. On CUDA also the same step captured as one CUDA graph: its replay time, the kernels inside it as the
    profiler sees them, and the difference (``bubble_ms``: the GPU idle between the graph's kernels, what fewer
    and fused kernels would win back). The top level repeats the first batch size's figures."""
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    sizes = sorted({int(b) for b in args.batch_sizes})
    eng = _make_engine(args, cuda, False, max_num_seqs=max(sizes), cuda_graphs=False, warmup=False)
    eng.load()
    by_batch = {b: _profile_decode(eng, b, cuda, args.prompt_len) for b in sizes}
    return {**by_batch[sizes[0]], "by_batch": {str(b): r for b, r in by_batch.items()}}


def _profile_decode(eng: Any, b: int, cuda: bool, prompt_len: int, steps: int = 10) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = eng.runner
    h = runner.embed(torch.zeros(b, dtype=torch.long)).unsqueeze(1)
    p = min(prompt_len, eng.max_model_len - 1)
    ctx = next(c for c in eng.ctx_buckets if c > p)
    bs = eng.opts.block_size
    nb = eng.max_blocks_per_seq
    dev = runner.device
    usable = runner.cache.num_blocks - 1  # block 0 is the padding rows' scratch block
    pos = torch.full((b,), p, dtype=torch.long, device=dev)
    tables = ((torch.arange(b * nb, dtype=torch.int32).view(b, nb)) % usable + 1).to(dev)  # rows may share blocks
    slots = torch.tensor([int(tables[r, p // bs]) * bs + p % bs for r in range(b)], device=dev)
    lens = torch.full((b,), p + 1, dtype=torch.int32, device=dev)
    args_ = (h, pos, slots, tables, lens, ctx)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def kernels(prof) -> list[tuple[str, float, int]]:
        rows = []
        for ev in prof.key_averages():
            if cuda:
                if str(getattr(ev, "device_type", "")).endswith("CUDA"):  # kernels and copies, not the ops launching
                    rows.append((ev.key, ev.self_device_time_total, ev.count))
            elif ev.key.startswith("aten::") and ev.self_cpu_time_total > 0:
                rows.append((ev.key, ev.self_cpu_time_total, ev.count))
        return [r for r in rows if r[1] > 0]

    with torch.inference_mode():
        for _ in range(3):
            runner.decode(*args_)
        sync()
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                runner.decode(*args_)
            sync()
        wall_ms = (time.perf_counter() - t) * 1000 / steps
    rows = kernels(prof)
    groups: dict[str, dict[str, float]] = {}
    for name, us, count in rows:
        g = groups.setdefault(_kernel_group(name), {"ms_per_step": 0.0, "kernels_per_step": 0.0})
        g["ms_per_step"] += us / 1000 / steps
        g["kernels_per_step"] += count / steps
    busy = sum(g["ms_per_step"] for g in groups.values())
    rows.sort(key=lambda r: -r[1])
    out = {"unit": "device kernels" if cuda else "CPU operators", "steps": steps, "batch": b, "context": ctx,
           "compiled_decode": eng.info.get("compiled_decode"), "wall_ms_per_step": round(wall_ms, 3),
           "busy_ms_per_step": round(busy, 3),
           "kernels_per_step": round(sum(g["kernels_per_step"] for g in groups.values()), 1),
           "groups": {k: {"ms_per_step": round(v["ms_per_step"], 3), "share": round(v["ms_per_step"] / busy, 3),
                          "kernels_per_step": round(v["kernels_per_step"], 1)}
                      for k, v in sorted(groups.items(), key=lambda kv: -kv[1]["ms_per_step"])},
           "top": [{"name": n[:120], "ms_per_step": round(us / 1000 / steps, 4), "calls_per_step": c / steps}
                   for n, us, c in rows[:15]]}
    if cuda:
        out.update(_profile_graph(runner, args_, steps, kernels))
    return out


def _profile_graph(runner: Any, args_: tuple, steps: int, kernels: Callable) -> dict[str, Any]:
    """The decode step as one CUDA graph: replay ms, the profiled kernels' sum inside it, and their gap."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                for _ in range(2):
                    runner.decode(*args_)
                with torch.cuda.graph(graph, stream=stream):
                    runner.decode(*args_)
            torch.cuda.current_stream().wait_stream(stream)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
            graph_ms = (time.perf_counter() - t) * 1000 / 20
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    graph.replay()
                torch.cuda.synchronize()
    except RuntimeError as e:  # a step that cannot be captured: the eager figures stand alone
        return {"graph_error": str(e)[:300]}
    inside = sum(us for _, us, _ in kernels(prof)) / 1000 / steps
    if inside <= 0:  # the profiler saw no kernel inside the replays (graph node tracing off): no gap to report
        return {"graph_ms_per_step": round(graph_ms, 3), "graph_kernel_ms_per_step": None, "bubble_ms": None}
    return {"graph_ms_per_step": round(graph_ms, 3), "graph_kernel_ms_per_step": round(inside, 3),
            "bubble_ms": round(graph_ms - inside, 3)}


def _load_hf(args: argparse.Namespace):
    import torch

    from serving.model import load_model, resolve_device

    dev = resolve_device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    model, _ = load_model(Path(args.model), dev, "auto", args.gptq_backend)
    return model, dev


def phase_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Plain HF ``generate`` (dynamic cache, padding-free equal-length prompts) under the same cap."""
    import torch

    out: dict[str, Any] = {"runs": []}
    if torch.cuda.is_available() and args.device != "cpu":
        out["bandwidth_gbps"] = round(measure_bandwidth() / 1e9, 1)  # before the cap
    _cap(args.gpu_memory_gb)
    model, dev = _load_hf(args)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        out["allocated_after_load_mib"] = round(torch.cuda.memory_allocated() / 2**20)
    vocab = model.config.vocab_size
    for b in args.batch_sizes:
        ids = torch.tensor(_prompts(vocab, b, args.prompt_len, seed=b), device=dev)
        try:
            with torch.inference_mode():
                model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_len,
                                     min_new_tokens=args.gen_len, do_sample=False)
                if cuda:
                    torch.cuda.synchronize()
            wall = time.perf_counter() - t
            n = (res.shape[1] - ids.shape[1]) * b
            run = {"batch": b, "wall_s": round(wall, 3), "tokens": n, "aggregate_tok_s": round(n / wall, 1)}
            if cuda:
                run["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        except torch.OutOfMemoryError as e:
            run = {"batch": b, "oom": str(e).splitlines()[0][:200]}
            if cuda:
                torch.cuda.empty_cache()
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
        if "oom" in run:
            break
    ok = [r for r in out["runs"] if "aggregate_tok_s" in r]
    out["best_aggregate_tok_s"] = max((r["aggregate_tok_s"] for r in ok), default=None)
    return out


def phase_generate_uncapped(args: argparse.Namespace) -> dict[str, Any]:
    """HF ``generate`` with no memory cap: what it takes to do the engine's work without the budget."""
    return phase_generate(argparse.Namespace(**{**vars(args), "gpu_memory_gb": None}))


def phase_hf_cb(args: argparse.Namespace) -> dict[str, Any]:
    """transformers' continuous batching (``generate_batch``), the candidate we measured and did not keep."""
    import torch
    from transformers import GenerationConfig

    _cap(args.gpu_memory_gb)
    model, dev = _load_hf(args)
    out: dict[str, Any] = {"runs": []}
    vocab = model.config.vocab_size
    for b in args.batch_sizes:
        prompts = _prompts(vocab, b, args.prompt_len, seed=b)
        gc = GenerationConfig(max_new_tokens=args.gen_len, min_new_tokens=args.gen_len, do_sample=False,
                              eos_token_id=-1, num_blocks=max(16, b * (args.prompt_len + args.gen_len) // 32 + 8),
                              block_size=32, max_batch_tokens=max(256, args.prompt_len * 2))
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = model.generate_batch(inputs=prompts, generation_config=gc)
            wall = time.perf_counter() - t
            n = sum(len(r.generated_tokens) for r in res.values())
            run = {"batch": b, "wall_s": round(wall, 3), "tokens": n, "aggregate_tok_s": round(n / wall, 1)}
            if dev.type == "cuda":
                run["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        except Exception as e:  # noqa: BLE001 - a candidate's failure is a result to report
            run = {"batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
        if "error" in run:
            break
    return out


PHASES = {"engine": phase_engine, "engine_compiled": lambda a: phase_engine(a, compile_decode=True),
          "legacy": lambda a: phase_engine(a, legacy=True), "chat": phase_chat,
          "chat_no_prefix": lambda a: phase_chat(a, prefix_caching=False),
          "chat_legacy": lambda a: phase_chat(a, legacy=True), "load": phase_load,
          "load_legacy": lambda a: phase_load(a, legacy=True),
          "load_prompt_admission": lambda a: phase_load(a, admission_lookahead_tokens=0, preemption_victim="newest"),
          "generate": phase_generate, "generate_uncapped": phase_generate_uncapped, "hf_cb": phase_hf_cb,
          "profile": phase_profile}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--gpu-memory-gb", type=float, default=4.0, help="0: no cap")
    p.add_argument("--batch-sizes", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512, help="the fixed-slot (legacy) engine's slot length")
    p.add_argument("--paged-max-model-len", type=int, default=0,
                   help="the paged engine's max_model_len (0: the model's own, limited by the budget)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cuda-stack-limit", type=int, default=0, help="engine.cuda_stack_limit in bytes (0: default)")
    p.add_argument("--turns", type=int, default=10, help="chat phases: turns")
    p.add_argument("--turn-gen", type=int, default=64, help="chat phases: tokens generated per turn")
    p.add_argument("--chat-system", type=int, default=0, help="chat phases: tokens of a system prompt at the "
                   "start of the conversation (within --paged-chat-len; at most half of it)")
    p.add_argument("--paged-chat-len", type=int, default=0, help="chat phases: tokens the whole conversation "
                   "reaches (0: the paged engine's max_model_len; the legacy chat needs it set to compare)")
    p.add_argument("--load-requests", type=int, default=64, help="load phases: requests")
    p.add_argument("--prompts", help="load phases: prompt file or folder (e.g. ../shared/data/instructionwild)")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--kv-cache-dtype", default="int8", choices=["auto", "int8"])
    p.add_argument("--embed-on-host", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--lm-head-int8", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--lm-head-int4", action="store_true", help="engine.lm_head_int4 (paged engine only)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--vendor-blas", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-vendor-blas: engine.vendor_blas=false (no cuBLAS/SDPA outside the GPTQ linears)")
    p.add_argument("--compile", action="store_true", help="engine.compile: torch.compile the decode layer")
    p.add_argument("--fuse-projections", action="store_true", help="engine.fuse_projections: q/k/v, gate/up "
                   "as one GEMM each")
    p.add_argument("--gptq-backend", default="auto",
                   choices=["auto", "marlin", "exllama_v2", "triton", "torch", "triton_gemv"])
    p.add_argument("--phases", default="engine,generate",
                   help="comma list of: engine (paged), legacy (fixed-slot engine of 9297f40), engine_compiled "
                        "(engine.compile on), chat, chat_no_prefix, chat_legacy (10-turn chat), load, load_legacy "
                        "(mixed-length load), load_prompt_admission (load under the first paged engine's admission "
                        "and preemption: engine.admission_lookahead_tokens=0, preemption_victim=newest), generate "
                        "(same cap), generate_uncapped, hf_cb, profile (kernel time of one eager decode step by kind)")
    p.add_argument("--hf-continuous-batching", action="store_true", help="also run the hf_cb phase")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        args.gpu_memory_gb = None  # no cap
    if args.phase:  # child process
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        print(json.dumps(PHASES[args.phase](args)))
        return 0
    phases = [x for x in args.phases.split(",") if x]
    if args.hf_continuous_batching and "hf_cb" not in phases:
        phases.append("hf_cb")
    raw = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "phase"}, "started": time.time()}
    for ph in phases:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "serving.bench", *raw, "--phase", ph], capture_output=True,
                              text=True)
        sys.stderr.write(proc.stderr[-4000:])
        try:
            report[ph] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            report[ph] = {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
        report[ph]["phase_s"] = round(time.monotonic() - t, 1)
        if ph == "chat" and not args.paged_chat_len and report[ph].get("chat_tokens"):
            raw = [*raw, "--paged-chat-len", str(report[ph]["chat_tokens"])]
    _summarize(report)
    _summarize_paged(report)
    emit_json(report, args.out)
    return 0


def _summarize(report: dict[str, Any]) -> None:
    eng, gen = report.get("engine") or report.get("engine_compiled", {}), report.get("generate", {})
    runs = [r for r in eng.get("runs", []) if "aggregate_tok_s" in r]
    if not runs:
        return
    s: dict[str, Any] = {"max_concurrency": eng.get("max_concurrency"),
                         "peak_allocated_serving_mib": eng.get("peak_allocated_serving_mib"),
                         "nvidia_smi_max": eng.get("nvidia_smi_max")}
    b1 = next((r for r in runs if r["batch"] == 1), None)
    if b1:
        s["batch1_decode_tok_s"] = b1["per_stream_decode_tok_s"]
        if eng.get("bandwidth_limit_tok_s"):
            s["batch1_fraction_of_bandwidth_limit"] = round(b1["per_stream_decode_tok_s"] /
                                                            eng["bandwidth_limit_tok_s"], 3)
    best = max(runs, key=lambda r: r["aggregate_tok_s"])
    s["best_aggregate_tok_s"] = best["aggregate_tok_s"]
    s["best_aggregate_batch"] = best["batch"]
    if gen:
        s["generate_at_budget_best_tok_s"] = gen.get("best_aggregate_tok_s")  # None: it did not fit the budget
        oom = [r["batch"] for r in gen.get("runs", []) if "oom" in r]
        s["generate_at_budget_oom_batch"] = oom[0] if oom else None
    # compiled next to eager pieces (a run of engine_compiled alone is the engine above)
    comp = [r for r in report.get("engine_compiled", {}).get("runs", []) if "aggregate_tok_s" in r] \
        if "engine" in report else []
    c1 = next((r for r in comp if r["batch"] == 1), None)
    if comp:
        s["compiled_max_concurrency"] = report["engine_compiled"].get("max_concurrency")
        s["compiled_best_aggregate_tok_s"] = max(r["aggregate_tok_s"] for r in comp)
    if b1 and c1:
        s["compiled_batch1_decode_tok_s"] = c1["per_stream_decode_tok_s"]
        s["compiled_batch1_speedup"] = round(c1["per_stream_decode_tok_s"] / b1["per_stream_decode_tok_s"], 2)
    for name in ("generate", "generate_uncapped"):
        g = report.get(name, {})
        if g.get("best_aggregate_tok_s"):
            s[f"speedup_vs_{name}"] = round(best["aggregate_tok_s"] / g["best_aggregate_tok_s"], 2)
        b1g = next((r for r in g.get("runs", []) if r.get("batch") == 1 and "aggregate_tok_s" in r), None)
        if b1 and b1g:
            s[f"batch1_speedup_vs_{name}"] = round(b1["per_stream_decode_tok_s"] / b1g["aggregate_tok_s"], 2)
    report["summary"] = s


def _summarize_paged(report: dict[str, Any]) -> None:
    """The issue's targets side by side: paged engine, fixed-slot engine, HF generate."""
    s: dict[str, Any] = {}
    smi = {ph: r.get("nvidia_smi_max", {}).get("process_mib") for ph, r in report.items()
           if isinstance(r, dict) and r.get("nvidia_smi_max")}
    if smi:
        s["nvidia_smi_process_peak_mib"] = smi
    eng, leg = report.get("engine", {}), report.get("legacy", {})
    if eng:
        s["paged_kv_cache_tokens"] = eng.get("kv_cache_tokens")
        s["paged_max_model_len"] = eng.get("max_model_len")
        s["paged_full_length_run_ok"] = "error" not in eng.get("full_length_run", {"error": 1})
    if leg:
        s["legacy_kv_cache_tokens"] = leg.get("kv_cache_tokens")
        s["legacy_max_model_len"] = leg.get("max_model_len")

    def b1(r: dict) -> float | None:
        return next((x["per_stream_decode_tok_s"] for x in r.get("runs", []) if x.get("batch") == 1
                     and "per_stream_decode_tok_s" in x), None)
    if b1(eng) and b1(leg):
        s["batch1_decode_tok_s"] = {"paged": b1(eng), "legacy": b1(leg), "ratio": round(b1(eng) / b1(leg), 3)}
    chat, nochat = report.get("chat", {}), report.get("chat_no_prefix", {})
    if chat.get("turns"):
        s["chat_ttft_s"] = {"prefix_caching": [t.get("ttft_s") for t in chat["turns"]],
                            "no_prefix_caching": [t.get("ttft_s") for t in nochat.get("turns", [])],
                            "legacy": [t.get("ttft_s") or t.get("error", "")[:60]
                                       for t in report.get("chat_legacy", {}).get("turns", [])]}
        pairs = [(a.get("ttft_s"), b.get("ttft_s")) for a, b in zip(chat["turns"][1:], nochat.get("turns", [])[1:],
                                                                     strict=False)]
        ratios = [round(a / b, 3) for a, b in pairs if a and b]
        if ratios:
            s["chat_ttft_ratio_turn2_on"] = {"max": max(ratios), "all": ratios,
                                             "system_tokens": chat.get("system_tokens", 0),
                                             "uncached_share": [_uncached_share(t) for t in chat["turns"][1:]]}
    load, lload = report.get("load", {}), report.get("load_legacy", {})
    if load.get("ok"):
        s["load"] = {"paged_tok_s": load.get("aggregate_tok_s"), "legacy_tok_s": lload.get("aggregate_tok_s"),
                     "paged_served": load.get("served"), "legacy_served": lload.get("served"),
                     "requests": load.get("requests")}
        pload = report.get("load_prompt_admission", {})
        if pload.get("ok"):
            s["load"].update(prompt_admission_tok_s=pload.get("aggregate_tok_s"),
                             preemptions=[pload.get("preemptions"), load.get("preemptions")],
                             recomputed_tokens=[pload.get("recomputed_tokens"), load.get("recomputed_tokens")])
        if lload.get("ok"):
            s["load"]["served_by_legacy_failed_by_paged"] = sum(
                1 for a, b in zip(load["ok"], lload["ok"], strict=False) if b and not a)
    gen = report.get("generate", {})
    if gen.get("best_aggregate_tok_s"):
        s["generate_best_tok_s"] = gen["best_aggregate_tok_s"]
    if s:
        report["summary_paged"] = s


if __name__ == "__main__":
    sys.exit(main())
