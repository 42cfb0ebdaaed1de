"""Where the whole process's GPU memory goes at the 4 GB profile, step by step, as nvidia-smi (NVML) counts it.

One engine load with the profile's options, then a short run that holds the cache full (one sequence of
max_model_len tokens, then two of half that at once), and JSON with:
- ``steps``: the engine's own load marks (``MemoryReport.steps``): [step, NVML MiB, allocated MiB, reserved MiB]
  after context, weights, lm_head, first_prefill, kv_cache, first_decode, graphs, fitted, warmed_up, with the
  step-to-step NVML deltas beside them (``deltas_mib``);
- ``peak_mib``: the process's NVML maximum over the whole run (load included), sampled every 0.2 s in a thread;
- the second run samples (temperature 0.8, top-p 0.9, top-k 50), as chat clients do;
- ``kv_cache_tokens``, ``max_model_len``, the runs' token counts, and ``targets``: peak <= 4,096 MiB while holding
  >= 1,024 cached int8 tokens (stretch 2,048).
A load that fails (the fit refusing, out of memory) still reports the steps it reached, with the error.

GPU (the lead's session; ``tests/gpu/serving_session.sh mem``):
    python3 tests/gpu/memory_probe.py --model /tmp/llama7b-gptq --no-vendor-blas --out $OUT/mem_own.json
CPU smoke (a tiny random Llama, no NVML: steps carry None):
    python tests/gpu/memory_probe.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_MIB, MIN_TOKENS, STRETCH_TOKENS = 4096, 1024, 2048


def other_gpu_processes() -> dict[int, int] | None:
    """MiB per compute process on the GPU other than this one (nvidia-smi), or None where it cannot be read.
    On a real 4 GB card they share the card: a child that opens a CUDA context costs its whole context there."""
    from serving.memory import compute_apps_mib

    apps = compute_apps_mib()
    return None if apps is None else {pid: mib for pid, mib in apps.items() if pid != os.getpid()}


class NvmlPeak:
    """This process's NVML MiB polled in a thread (``serving.memory.process_gpu_mib``), maximum and last kept."""

    def __init__(self, device_index: int, interval_s: float = 0.2):
        self.index, self.interval = device_index, interval_s
        self.peak: int | None = None
        self.samples = 0
        self.others_peak: int | None = None  # MiB of every other process on the GPU at once, at most
        self.other_pids: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from serving.memory import process_gpu_mib

        while not self.stop.is_set():
            mib, _ = process_gpu_mib(self.index)
            if mib is not None:
                self.peak = max(self.peak or 0, mib)
                self.samples += 1
            others = other_gpu_processes()
            if others is not None:  # e.g. compile workers that opened a CUDA context of their own on this card
                self.others_peak = max(self.others_peak or 0, sum(others.values()))
                self.other_pids.update(others)
            self.stop.wait(self.interval)

    def __enter__(self) -> NvmlPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def _run(eng, lengths: list[int], gen: int, vocab: int, seed: int, sampled: bool = False) -> dict:
    """``len(lengths)`` sequences at once, each ``lengths[i]`` tokens in all (prompt + ``gen`` new, ignore_eos);
    ``sampled``: temperature 0.8, top-p 0.9, top-k 50 (a chat client's settings: the sampler's kernels load)."""
    import torch

    from serving.sampler import SamplingParams

    g = torch.Generator().manual_seed(seed)
    done = [threading.Event() for _ in lengths]
    got = [0] * len(lengths)
    errors: list[str] = []
    t0 = time.perf_counter()
    for i, n in enumerate(lengths):
        ids = torch.randint(10, max(11, vocab - 10), (n - gen,), generator=g).tolist()

        def sink(o, i=i):
            if isinstance(o, BaseException):
                errors.append(f"{type(o).__name__}: {str(o)[:200]}")
                done[i].set()
                return
            got[i] = o.completion_tokens
            if o.finish_reason:
                done[i].set()

        params = SamplingParams(max_tokens=gen, temperature=0.8, top_p=0.9, top_k=50, seed=seed + i,
                                ignore_eos=True) if sampled else SamplingParams(max_tokens=gen, temperature=0.0,
                                                                                ignore_eos=True)
        eng.add_request(ids, params, sink)
    for d in done:
        d.wait(1800)
    return {"lengths": lengths, "sampled": sampled, "generated": got, "cached_tokens_held": sum(n - 1 for n in lengths),
            "errors": errors, "s": round(time.perf_counter() - t0, 2)}


def _triton_kernels_local_memory() -> list[dict]:
    """Every loaded Triton kernel in the process (ours and Inductor's, found by the garbage collector): its
    registers, spills and local memory per thread (``cuFuncGetAttribute``), largest local memory first. Local
    memory is reserved for every thread the GPU can hold (132 SMs x 2,048 on the H200: 264 KiB per byte), so a
    kernel needing L bytes more than the stack limit grows the process by about L x 264 KiB on its first launch."""
    import ctypes
    import gc

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    rows, seen = [], set()
    for obj in gc.get_objects():
        try:  # any object: a lazy one's __getattr__ may raise anything
            fn = getattr(obj, "function", None) if hasattr(obj, "n_spills") else None
        except Exception:  # noqa: BLE001
            continue
        if not isinstance(fn, int) or fn in seen:
            continue
        seen.add(fn)
        attr = {}
        for key, code in (("local_bytes", 3), ("regs", 4)):  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, _NUM_REGS
            v = ctypes.c_int()
            attr[key] = v.value if cuda.cuFuncGetAttribute(ctypes.byref(v), code, ctypes.c_void_p(fn)) == 0 else None
        rows.append({"name": str(getattr(obj, "name", type(obj).__name__))[:120], "spills": obj.n_spills, **attr})
    return sorted(rows, key=lambda r: -(r["local_bytes"] or 0))


def _lmem_diag(out: dict, label: str) -> None:
    """NVML and the stack limit now (``out["lmem"][label]``)."""
    import torch

    from serving.memory import cuda_stack_limit, process_gpu_mib

    torch.cuda.synchronize()
    out.setdefault("lmem", {})[label] = {"nvml_mib": process_gpu_mib(0)[0], "stack_limit": cuda_stack_limit()}


class OpTrace:
    """Which call grows the process outside the allocator (module code loaded, local memory, library handles):
    the serving package's functions and every module's forward are wrapped; each call outside a CUDA-graph
    capture is bracketed by a device sync and ``cudaMemGetInfo`` (the device's free bytes, read at once: NVML's
    per-process figure trails), less the allocator's reserved growth. Per name: calls that grew it, the largest and
    the total growth in MiB, and the load step it first happened in. Nested calls count in their callers too: the
    innermost name is the one to read. Costs two syncs a call, so it stops after ``limit`` calls. Installed for the
    rest of the process (the probe's), never removed."""

    PACKAGES = ("serving.runner", "serving.sampler", "serving.kernels.paged_attention", "serving.kernels.w8a16",
                "serving.engine", "serving.prefill_batch")
    NAMES = ("fused_decode_layer", "decode_layer", "_decode_attend", "rope_cos_sin", "sample", "sampling_probs",
             "draw", "process_logits", "apply_logits_processors", "_uniforms", "paged_decode_attention", "write_kv",
             "paged_prefill_attention", "w8a16_linear")
    METHODS = ("rope", "embed", "_qkv", "_mlp_block", "prefill_attention", "prefill", "decode", "attend_decode")

    def __init__(self, limit: int = 20000):
        self.limit, self.calls, self.step = limit, 0, "load"
        self.rows: dict[str, dict] = {}
        self._stack: list[tuple[int, int]] = []

    def _before(self) -> bool:
        import torch

        if self.calls >= self.limit or not torch.cuda.is_initialized() or torch.cuda.is_current_stream_capturing():
            return False
        self.calls += 1
        torch.cuda.synchronize()
        self._stack.append((torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()))
        return True

    def _after(self, name: str) -> None:
        import torch

        free0, res0 = self._stack.pop()
        torch.cuda.synchronize()
        grew = (free0 - torch.cuda.mem_get_info()[0]) - (torch.cuda.memory_reserved() - res0)
        if grew > 0:
            r = self.rows.setdefault(name, {"calls_grew": 0, "max_mib": 0.0, "total_mib": 0.0, "first_step": self.step,
                                            "depth": len(self._stack)})
            r["calls_grew"] += 1
            r["max_mib"] = round(max(r["max_mib"], grew / 2**20), 1)
            r["total_mib"] = round(r["total_mib"] + grew / 2**20, 1)

    def _wrap(self, name: str, fn):
        import functools

        @functools.wraps(fn)
        def traced(*a, **k):
            if not self._before():
                return fn(*a, **k)
            try:
                return fn(*a, **k)
            finally:
                self._after(name)
        return traced

    def install(self) -> OpTrace:
        import importlib

        import torch

        originals = {}
        for mod_name in self.PACKAGES:
            mod = importlib.import_module(mod_name)
            for n in self.NAMES:
                f = getattr(mod, n, None)
                if callable(f) and not isinstance(f, type):
                    originals.setdefault(id(f), (n, f))
        mods = [m for k, m in list(sys.modules.items()) if k.startswith("serving") and m is not None]
        for _, (n, f) in originals.items():
            w = self._wrap(n, f)
            for m in mods:
                for attr, v in list(vars(m).items()):
                    if v is f:
                        setattr(m, attr, w)
        from serving.runner import LlamaRunner

        for n in self.METHODS:
            f = getattr(LlamaRunner, n, None)
            if callable(f):
                setattr(LlamaRunner, n, self._wrap(f"LlamaRunner.{n}", f))
        from serving.engine import LLMEngine

        mark = LLMEngine._mark

        def traced_mark(eng, step):
            self.step = step
            return mark(eng, step)
        LLMEngine._mark = traced_mark

        def pre(module, _inp):
            if self._before():
                module._optrace_on = True

        def post(module, _inp, _out):
            if getattr(module, "_optrace_on", False):
                module._optrace_on = False
                self._after(type(module).__name__)
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                       torch.nn.modules.module.register_module_forward_hook(post)]
        return self

    def report(self) -> list[dict]:
        rows = [{"name": n, **r} for n, r in self.rows.items()]
        return sorted(rows, key=lambda r: (-r["total_mib"], -r["depth"]))[:40]


def probe(args: argparse.Namespace) -> dict:
    import torch

    from serving.engine import EngineConfig, LLMEngine

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    opts = EngineConfig(
        device="cuda" if cuda else "cpu", gpu_memory_gb=args.gpu_memory_gb, max_model_len=args.max_model_len or None,
        kv_cache_dtype="int8", embed_on_host=True if cuda else None, lm_head_int8=not args.lm_head_int4,
        lm_head_int4=args.lm_head_int4,
        cuda_stack_limit=args.cuda_stack_limit if cuda else None, prefill_chunk=args.prefill_chunk,
        compile=args.compile and cuda, vendor_blas=args.vendor_blas, max_num_seqs=max(2, args.max_num_seqs),
        gptq_backend=args.gptq_backend, warmup=True)
    out: dict = {"args": vars(args), "device": opts.device, "options": opts.model_dump()}
    trace = OpTrace().install() if args.op_trace else None
    eng = LLMEngine(args.model, opts)
    with NvmlPeak(0) as peak:
        t0 = time.monotonic()
        try:
            eng.load_and_start()
        except Exception as e:  # noqa: BLE001 - the steps reached are the result
            out["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        out["load_s"] = round(time.monotonic() - t0, 1)
        if args.lmem_diag and cuda:  # which kernels grew local memory (also when the fit refused the load)
            out["triton_kernels"] = _triton_kernels_local_memory()[:25]
        if trace is not None:
            out["op_trace_load"] = trace.report()
        if args.out:  # what the load showed, in case the runs do not finish within the call
            Path(args.out).write_text(json.dumps({**out, "steps": eng.memory.to_dict()["steps"], "partial": True},
                                                 indent=1, default=str))
        if "error" not in out:
            if args.lmem_diag and cuda:  # the stack limit and NVML before the runs
                _lmem_diag(out, "after_load")
            n = eng.max_model_len
            gen = min(args.gen_len, n // 4)
            if trace is not None:
                trace.step, trace.rows = "runs", {}
            out["runs"] = [_run(eng, [n], gen, eng.runner.vocab, 1),
                           _run(eng, [n // 2, n // 2], gen, eng.runner.vocab, 2, sampled=True)]
            if trace is not None:
                out["op_trace_runs"] = trace.report()
            if args.lmem_diag and cuda:
                _lmem_diag(out, "after_runs")
            out["memory_report"] = eng.memory_report()
            eng.shutdown()
        time.sleep(0.5)  # one more sample after the last step
    rep = eng.memory.to_dict()
    steps = rep["steps"]
    out["steps"] = steps
    prev = None
    deltas = {}
    for name, mib, _alloc, _res in steps:
        if mib is not None and prev is not None:
            deltas[name] = mib - prev
        prev = mib if mib is not None else prev
    out["deltas_mib"] = deltas
    out["peak_mib"] = peak.peak
    out["other_processes_peak_mib"], out["other_processes"] = peak.others_peak, peak.other_pids
    out["nvml_samples"] = peak.samples
    out["kv_cache_tokens"] = eng.info.get("kv_cache_tokens")
    out["max_model_len"] = eng.info.get("max_model_len")
    out["vendor_blas"] = eng.info.get("vendor_blas")
    ok_runs = "error" not in out and all(not r["errors"] for r in out.get("runs", []))
    tokens = out["kv_cache_tokens"] or 0
    out["targets"] = {
        "peak_le_4096_mib": None if peak.peak is None else peak.peak <= TARGET_MIB,
        "holds_1024_tokens": ok_runs and tokens >= MIN_TOKENS and (out["max_model_len"] or 0) >= MIN_TOKENS,
        "stretch_2048_tokens": ok_runs and tokens >= STRETCH_TOKENS,
    }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF or GPTQ folder (required without --smoke)")
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny random Llama made here")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--gpu-memory-gb", type=float, default=4.0)
    p.add_argument("--max-model-len", type=int, default=1024,
                   help="engine.max_model_len (0: the model's own, limited by what the budget holds)")
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--cuda-stack-limit", type=int, default=256)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--vendor-blas", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-vendor-blas: engine.vendor_blas=false (the 4 GB profile)")
    p.add_argument("--gptq-backend", default="auto")
    p.add_argument("--lm-head-int4", action="store_true", help="engine.lm_head_int4 instead of the int8 lm_head")
    p.add_argument("--lmem-diag", action="store_true",
                   help="CUDA: the stack limit and NVML after load and after the runs, and every loaded Triton "
                        "kernel's local memory per thread (what grows the process past its bare context)")
    p.add_argument("--op-trace", action="store_true",
                   help="CUDA: which calls grow the process outside the allocator during the load (OpTrace)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if not args.smoke and not args.model:
        p.error("--model is required without --smoke")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's serving package, not an installed one
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny_llama

        args.device, args.model = "cpu", str(make_tiny_llama(Path(tempfile.mkdtemp(prefix="memprobe-"))))
        args.max_model_len = min(args.max_model_len or 256, 256)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = probe(args)
    from serving.bench import emit_json

    emit_json(result, args.out, indent=1, default=str)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
