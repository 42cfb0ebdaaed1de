"""W4A16 decode GEMVs on one GPU: tune serving/kernels/w4a16.py per (shape, row bucket), then time a
LLaMA-7B-shaped stack (32 layers of qkv 4096x12288, o 4096x4096, gate_up 4096x22016, down 11008x4096) captured
whole as one CUDA graph, next to fp16 cuBLAS, torch's int4 tinygemm and GPTQModel's Marlin (when it imports).

In one run, side by side at rows 1, 2, 4, 8: kernel 1 with the shipped table (``v1``: the H200-tuned
serving/kernels/w4a16_configs.json, timed again here, not re-tuned), kernels 2 and 3 tuned here within the
budget (``v2``), the per-(shape, rows) faster of the two (``ours``: the table written for the engine), fp16 cuBLAS and
tinygemm, each with its share of the copy bandwidth (``summary``).

    python tests/gpu/bench_w4a16.py [--budget-s 120] [--grid quick|full] [--batches 1,2,4,8]
                                    [--engine-ckpt DIR]   # + serving.bench decode at batch 1, 4: marlin vs ours
    python tests/gpu/bench_w4a16.py --table w4a16_configs.json --backends ours,marlin   # no tuning
    python tests/gpu/bench_w4a16.py --retune-v1 ...  # kernel 1 searched too (the budget is shared)
    python tests/gpu/bench_w4a16.py --engine-only --table T.json --engine-ckpt DIR   # only serving.bench
    python tests/gpu/bench_w4a16.py --smoke    # CPU: tiny shapes under TRITON_INTERPRET=1, same code paths

Prints JSON and writes $OUT/w4a16.json (results) and $OUT/w4a16_configs.json (the tuned table: copy it to
serving/kernels/w4a16_configs.json). Weights are random: honest for speed, never for quality. Weight sets
are several times the 50 MiB L2 so no timing reads from cache. Compilation of the config grid runs in worker
processes first (Triton's on-disk cache), so the tuning itself only times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.kernels import reference as ref  # noqa: E402
from serving.kernels import w4a16  # noqa: E402
from serving.kernels.w4a16 import GemvConfig, PackedW4, SplitKWorkspace  # noqa: E402

SHAPES = [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)]
GS = 128
L2_BYTES = 50 * 1024**2


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- measurement helpers

def copy_bandwidth(dev: str) -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 20
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / dt


def graph_us(fn, reps: int = 10) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph (warm-up and capture outside the timing)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    del g
    return e0.elapsed_time(e1) / reps * 1e3


def wall_us(fn, reps: int = 1) -> float:
    """CPU (interpreter) stand-in for ``graph_us``: wall time per call."""
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def random_packed(k: int, n: int, dev: str, gen: torch.Generator) -> PackedW4:
    """Random 4-bit weights straight in the kernel's layout (random words are random nibbles: the same bytes
    and work as repacking a random GPTQ checkpoint, without the repack time for 3.4 GB)."""
    kp = -(-k // w4a16.CHUNK) * w4a16.CHUNK
    words = torch.randint(-2**31, 2**31 - 1, (n, kp // 8), dtype=torch.int32, device=dev, generator=gen)
    groups = kp // GS
    s = torch.rand(groups, n, device=dev, generator=gen, dtype=torch.float32).mul(0.01).add(0.001).half()
    z = torch.full((groups, n), 8.0, device=dev, dtype=torch.float16)
    return PackedW4(words, torch.stack([s, z], -1).contiguous(), None, k, n, GS)


# -- the config grid

def candidates(n: int, k: int, m: int, grid: str, sms: int, kernel: int = 1) -> list[GemvConfig]:
    if kernel == 2:
        return candidates2(n, k, m, grid, sms)
    chunks = -(-k // w4a16.CHUNK)
    blocks = (16, 32, 64, 128) if grid == "quick" else (16, 32, 64, 128, 256)
    warps = (2, 4, 8) if grid == "quick" else (1, 2, 4, 8)
    # num_stages leaves the SASS of this loop unchanged with triton 3.9 (no tl.dot to pipeline for): one value
    # in the quick grid; the kernel's own prefetch flag is the knob that keeps more bytes in flight
    stages = (1,) if grid == "quick" else (1, 2, 3)
    out = []
    for bn, nw, ns in itertools.product(blocks, warps, stages):
        tiles = -(-n // bn)
        splits = [s for s in (1, 2, 4, 8, 16) if s <= chunks and (s == 1 or tiles * s <= 16 * sms)
                  and (s == 1 or tiles * (s // 2) < 4 * sms)]
        # (scale_w, dot): 3-D FMA tiles cost 9.5 SASS instructions per weight at two rows against tl.dot's 7.4
        # (serving.kernels.sass), so from 4 rows on the quick grid tries tl.dot only
        if m == 1:
            variants = [(False, False), (True, False)]
        elif m == 2 or grid == "full":
            variants = [(False, False), (True, False), (False, True)]
        else:
            variants = [(False, True)]
        for split, (scale_w, dot), pf in itertools.product(splits, variants, (False, True)):
            out.append(GemvConfig(block_n=bn, split_k=split, num_warps=nw, num_stages=ns, scale_w=scale_w, dot=dot,
                                  prefetch=pf))
    return out


def _splits(n: int, k: int, bn: int, sms: int) -> list[int]:
    chunks = -(-k // w4a16.CHUNK)
    tiles = -(-n // bn)
    return [s for s in (1, 2, 4, 8, 16) if s <= chunks and (s == 1 or tiles * s <= 16 * sms)
            and (s == 1 or tiles * (s // 2) < 4 * sms)]


def candidates2(n: int, k: int, m: int, grid: str, sms: int) -> list[GemvConfig]:
    """Kernel 2's grid: its tl.dot loop at every row count (4.1-4.3 SASS instructions per weight from 1 to 8 rows
    at 128-256 outputs a program, serving.kernels.sass, sm_90: the rows ride on the tensor cores), and its
    CUDA-core loop at 1 and 2 rows (5.1 and 7.2 at 32 outputs: no shared-memory round trip, so possibly lower
    latency). Both unroll 1 or 2 chunks."""
    out = []
    combos = [(True, bn, nw) for bn in (32, 64, 128, 256) for nw in (2, 4, 8)]
    if m <= 2:
        combos += [(False, bn, nw) for bn in (16, 32, 64, 128) for nw in (1, 2, 4, 8)]
    for (dot, bn, nw), un in itertools.product(combos, (1, 2)):
        words = bn // nw  # words a thread holds: below 4 idle lanes, above 64 (32 at 2 FMA rows) 255 registers;
        # tl.dot below 16: 5.1 to 9.6 instructions per weight against 4.1-4.4 (every tl.dot key, triton 3.6, sm_90)
        if words < (16 if dot else 4) or words > (32 if (m == 2 and not dot) else 64):
            continue
        for sw in ((False, True) if (m == 1 and not dot) else (False,)):  # FMA at 2+ rows: always scaled once
            for split in _splits(n, k, bn, sms):
                out.append(GemvConfig(block_n=bn, split_k=split, num_warps=nw, num_stages=1, scale_w=sw, dot=dot,
                                      kernel=2, unroll=un))
    # kernel 3 (fp16 nibble pairs, wgmma with the weight tile in registers): 3.9-4.4 instructions per weight on
    # these tiles, 4.4-9.8 elsewhere (64 outputs on 8 warps: half a warpgroup's tile)
    for bn, nw in ((64, 4), (128, 4), (128, 8), (256, 8)):
        for split in _splits(n, k, bn, sms):
            out.append(GemvConfig(block_n=bn, split_k=split, num_warps=nw, num_stages=1, dot=True, kernel=3))
    # kernel 3 at one row with packed fp16 FMAs: 4.1 instructions per weight at 16 words a thread (triton 3.6,
    # sm_90; kernel 2's CUDA-core loop 5.1), 4.4-5.9 or 255 registers at other ratios
    if m == 1:
        for bn, nw in ((32, 2), (64, 4), (128, 8)):
            for split in _splits(n, k, bn, sms):
                out.append(GemvConfig(block_n=bn, split_k=split, num_warps=nw, num_stages=1, dot=False, kernel=3))
    return out


def _compile_key(cfg: GemvConfig, m: int) -> tuple:
    rows = 16 if cfg.dot else w4a16.bucket(m)  # tl.dot pads every bucket to 16 rows: one compile for all
    return (cfg.block_n, cfg.split_k > 1, cfg.num_warps, cfg.num_stages, cfg.scale_w, cfg.dot, cfg.prefetch, rows,
            cfg.kernel, cfg.unroll)


def _compile_worker(jobs: list[tuple]) -> int:
    """Compile (by running once on a small layer with the same specializations) into Triton's disk cache."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    p = random_packed(4096, 256, dev, gen)
    ws = SplitKWorkspace(dev, 256)
    ok = 0
    for bn, split, nw, ns, scale_w, dot, pf, m, kernel, unroll in jobs:
        x = torch.randn(min(m, w4a16.MAX_ROWS), 4096, device=dev, dtype=torch.float16)  # tl.dot keys say 16
        try:
            w4a16.gemv(x, p, GemvConfig(bn, 2 if split else 1, nw, ns, scale_w, dot, pf, kernel, unroll), ws)
            ok += 1
        except Exception:  # noqa: BLE001 -- a config that does not compile is skipped by the tuner too
            pass
    torch.cuda.synchronize()
    return ok


def precompile(keys: set[tuple], workers: int) -> dict:
    jobs = sorted(keys)
    t = time.time()
    if workers <= 1 or not jobs:
        return {"configs": len(jobs), "workers": 0, "s": 0.0}
    chunks = [jobs[i::workers] for i in range(workers)]
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        ok = sum(ex.map(_compile_worker, chunks))
    return {"configs": len(jobs), "compiled": ok, "workers": workers, "s": round(time.time() - t, 1)}


def _time_configs(cands, deadline, run_of, smoke) -> tuple[list, dict]:
    results, errors = [], {}
    for cfg in cands:
        if time.time() > deadline and results:
            break
        try:
            results.append(((wall_us if smoke else graph_us)(run_of(cfg)), cfg))
        except Exception as e:  # noqa: BLE001 -- a failing config is reported, not fatal
            errors.setdefault(type(e).__name__, repr(e)[:300])
    results.sort(key=lambda r: r[0])
    return results, errors


def tune(shapes, batches, grid: str, budget_s: float, dev: str, sms: int, bw: float, smoke: bool,
         old_table: dict[str, GemvConfig], retune_v1: bool = False) -> tuple[dict, dict]:
    """Per (shape, row bucket): kernel 1's shipped config (``old_table``, else the default; with ``retune_v1``
    its grid too) and kernel 2's grid, graph-timed over weight copies larger than L2. Returns the tables
    {"v1", "v2", "ours" (the faster of the two)} and a report."""
    gen = torch.Generator(device=dev).manual_seed(1)
    tables: dict[str, dict[str, GemvConfig]] = {"v1": {}, "v2": {}, "ours": {}}
    report = {}
    deadline = time.time() + budget_s
    keys_left = len(shapes) * len(batches)
    for name, k, n in shapes:
        one = random_packed(k, n, dev, gen)
        copies = 1 if smoke else max(2, -(-4 * L2_BYTES // w4a16.weight_bytes(one)))
        packs = [one] + [random_packed(k, n, dev, gen) for _ in range(copies - 1)]
        ws = SplitKWorkspace(dev, n)
        nbytes = w4a16.weight_bytes(one)
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            out = torch.empty(m, n, device=dev, dtype=torch.float16)
            key = w4a16.config_key(n, k, w4a16.bucket(m))

            def run_of(cfg, x=x, out=out, packs=packs, ws=ws):
                def run():
                    for p in packs:
                        w4a16.gemv(x, p, cfg, ws, out=out)
                return run

            v1 = [old_table.get(key) or w4a16.default_config(n, k, m)]
            v2 = candidates(n, k, m, grid, sms, kernel=2)
            rng = random.Random(0)
            rng.shuffle(v2)  # a sweep cut short by the budget still samples the whole grid
            # ...after the tiles with the fewest SASS instructions per weight (serving.kernels.sass on sm_90)
            v2.sort(key=lambda c: not (c.kernel == 3 or (c.dot and c.block_n >= 128)
                                       or (not c.dot and c.block_n == 32)))
            if retune_v1:
                more = [c for c in candidates(n, k, m, grid, sms) if c != v1[0]]
                rng.shuffle(more)
                v1 += more
            if smoke:  # the interpreter runs ~20 programs a second: two kernel-2 configs (one each way), one kernel 3
                v1 = v1[:1]
                v2 = ([c for c in v2 if c.kernel == 2 and c.split_k > 1 and c.unroll == 2][:1]
                      + [c for c in v2 if c.kernel == 2 and c.split_k == 1][:1] + [c for c in v2 if c.kernel == 3][:1])
            # an equal share of what is left for each (shape, rows), so a slow start cannot starve the last ones
            share = max(0.0, deadline - time.time()) / keys_left
            keys_left -= 1
            t0 = time.time()
            r1, e1 = _time_configs(v1, t0 + (share / 2 if retune_v1 else 0), run_of, smoke)
            r2, e2 = _time_configs(v2, t0 + share, run_of, smoke)
            entry = {"shape": name, "rows": m}
            best = []
            for label, res, err in (("v1", r1, e1), ("v2", r2, e2)):
                if not res:
                    entry[label] = {"error": err or "no time left"}
                    continue
                us, cfg = res[0][0] / len(packs), res[0][1]
                tables[label][key] = cfg
                best.append((us, label, cfg))
                entry[label] = {"config": asdict(cfg), "us": round(us, 2), "GBps": round(nbytes / (us * 1e-6) / 1e9, 1),
                                "pct_of_copy_bw": round(100 * nbytes / (us * 1e-6) / bw, 1), "tried": len(res),
                                "failed": err, "runner_up": [{"us": round(u / len(packs), 2), **asdict(c)}
                                                             for u, c in res[1:3]]}
            if best:
                us, label, cfg = min(best, key=lambda b: b[0])
                tables["ours"][key] = cfg
                entry["winner"] = label
            report[key] = entry
            log(key, {lb: entry[lb].get("us") for lb in ("v1", "v2")}, "->", entry.get("winner"))
        del packs, one
        if dev == "cuda":
            torch.cuda.empty_cache()
    return tables, report


# -- correctness on the device: real GPTQ tensors through repack, tuned configs, vs the fp32 reference

def check(shapes, batches, table, dev: str) -> list[dict]:
    out = []
    cases = [(name, k, n, True, False) for name, k, n in shapes] + [(shapes[1][0] + "_asym_act_order", shapes[1][1],
                                                                    shapes[1][2], False, True)]
    for name, k, n_full, sym, act in cases:
        n = min(n_full, 4096)  # the shape's tuned config on its first 4096 outputs: same tiles and K slices
        t = ref.random_gptq(k, n, GS, sym=sym, act_order=act, seed=k + n, device=dev)
        lin_p = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], GS)
        ws = SplitKWorkspace(dev, n)
        for m in batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            want = ref.gptq_linear(x, **t)
            cfg = table.get(w4a16.config_key(n_full, k, w4a16.bucket(m))) or w4a16.default_config(n_full, k, m)
            got = w4a16.gemv(x, lin_p, cfg, ws).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            out.append({"case": name, "rows": m, "max_rel_err": float(f"{err:.3g}"), "ok": err < 5e-3})
        big = torch.randn(33, k, device=dev, dtype=torch.float16)  # the prefill path
        err = ((w4a16.matmul_dequant(big, lin_p).float() - ref.gptq_linear(big, **t)).abs().max()
               / ref.gptq_linear(big, **t).abs().max()).item()
        out.append({"case": name, "rows": 33, "max_rel_err": float(f"{err:.3g}"), "ok": err < 5e-3})
        del t, lin_p
    return out


def sass_of_chosen(table, batches) -> list[dict]:
    """Registers, spills and SASS instructions per weight of the configs chosen for the qkv shape (this
    machine's triton; ``serving.kernels.sass``)."""
    from serving.kernels.sass import compile_gemv, sass_stats

    out = []
    _, k, n = SHAPES[0]
    for m in batches:
        cfg = table.get(w4a16.config_key(n, k, w4a16.bucket(m)))
        if cfg is None:
            continue
        try:
            out.append({"rows": m, **sass_stats(compile_gemv(cfg, w4a16.bucket(m), split=cfg.split_k > 1), cfg)})
        except Exception as e:  # noqa: BLE001 -- diagnostics only
            out.append({"rows": m, "error": repr(e)[:300]})
    return out


# -- stacks

def stack_ours(layers: int, table, dev: str, cache: dict):
    """Our kernels over one set of random packed layers (built once in ``cache``, timed with each table)."""
    if "mods" not in cache:
        gen = torch.Generator(device=dev).manual_seed(2)
        cache["mods"] = [[random_packed(k, n, dev, gen) for _, k, n in SHAPES] for _ in range(layers)]
        cache["ws"] = SplitKWorkspace(dev, max(n for _, _, n in SHAPES))
    mods, ws = cache["mods"], cache["ws"]
    nbytes = sum(w4a16.weight_bytes(p) for ly in mods for p in ly)

    def make(xs, m):
        cfgs = [table.get(w4a16.config_key(n, k, w4a16.bucket(m))) or w4a16.default_config(n, k, m)
                for _, k, n in SHAPES]
        outs = [torch.empty(m, n, device=dev, dtype=torch.float16) for _, _, n in SHAPES]

        def run():
            for ly in mods:
                for (_, k, _), p, cfg, o in zip(SHAPES, ly, cfgs, outs, strict=True):
                    w4a16.gemv(xs[k], p, cfg, ws, out=o)
        return run
    return make, nbytes, torch.float16


def stack_fp16(layers: int, dev: str):
    ws = [[torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _, k, n in SHAPES] for _ in range(layers)]

    def make(xs, m):
        def run():
            for ly in ws:
                for (_, k, _), w in zip(SHAPES, ly, strict=True):
                    F.linear(xs[k], w)
        return run
    return make, sum(w.numel() * 2 for ly in ws for w in ly), torch.float16


def stack_tinygemm(layers: int, dev: str):
    mods = []
    nbytes = 0
    for _ in range(layers):
        ly = []
        for _, k, n in SHAPES:
            wq = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
            packed_u8 = (wq[:, ::2] << 4 | wq[:, 1::2]).contiguous()
            wp = torch._convert_weight_to_int4pack(packed_u8, 8)
            sz = torch.stack([torch.full((k // GS, n), 0.004, device=dev), torch.zeros(k // GS, n, device=dev)],
                             -1).to(torch.bfloat16).contiguous()
            ly.append((wp, sz))
            nbytes += wq.numel() // 2 + sz.numel() * 2
            del wq, packed_u8
        mods.append(ly)

    def make(xs, m):
        def run():
            for ly in mods:
                for (_, k, _), (wp, sz) in zip(SHAPES, ly, strict=True):
                    torch._weight_int4pack_mm(xs[k], wp, GS, sz)
        return run
    return make, nbytes, torch.bfloat16


def stack_marlin(layers: int, dev: str):
    from gptqmodel.nn_modules.qlinear.marlin import MarlinQuantLinear

    mods = []
    nbytes = 0
    for _ in range(layers):
        ly = []
        for _, k, n in SHAPES:
            m = MarlinQuantLinear(bits=4, group_size=GS, desc_act=False, sym=True, in_features=k, out_features=n,
                                  bias=False, dtype=torch.float16).to(dev)
            m.qweight.data.copy_(torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=dev))
            m.scales.data.copy_(torch.full((k // GS, n), 0.004, dtype=torch.float16, device=dev))
            nbytes += k * n // 2 + (k // GS) * n * 2
            m.post_init()
            ly.append(m.eval())
        mods.append(ly)

    def make(xs, m):
        def run():
            with torch.inference_mode():
                for ly in mods:
                    for (_, k, _), mod in zip(SHAPES, ly, strict=True):
                        mod(xs[k])
        return run
    return make, nbytes, torch.float16


def time_stack(name, build, batches, bw, dev) -> list[dict]:
    rows = []
    try:
        t0 = time.time()
        make, nbytes, dt = build()
        build_s = time.time() - t0
        for m in batches:
            xs = {k: torch.randn(m, k, device=dev, dtype=dt) for k in {4096, 11008}}
            run = make(xs, m)
            run()
            torch.cuda.synchronize()
            us = graph_us(run, reps=20)
            rows.append({"backend": name, "batch": m, "ms_per_stack": round(us / 1e3, 3),
                         "weight_GB": round(nbytes / 1e9, 3), "GBps": round(nbytes / (us * 1e-6) / 1e9, 1),
                         "pct_of_copy_bw": round(100 * nbytes / (us * 1e-6) / bw, 1),
                         "tok_s_gemv_only": round(1e6 / us * m, 1), "build_s": round(build_s, 1)})
            log(json.dumps(rows[-1]))
        del make
    except Exception as e:  # noqa: BLE001 -- one backend failing must not lose the others' numbers
        rows.append({"backend": name, "error": repr(e)[:500], "tb": traceback.format_exc()[-1500:]})
        log("FAILED", name, repr(e)[:300])
    torch.cuda.empty_cache()
    return rows


ENGINE_FLAGS = ["--device", "cuda", "--gpu-memory-gb", "4", "--kv-cache-dtype", "int8", "--embed-on-host",
                "--lm-head-int8", "--cuda-stack-limit", "256", "--max-model-len", "512", "--prefill-chunk", "128",
                "--prompt-len", "128", "--gen-len", "128", "--compile", "--fuse-projections", "--phases", "engine",
                "--batch-sizes", "1,4"]


def engine_runs(ckpt: str, table_path: Path, out_dir: Path, wait_s: float, timeout_s: float,
                backends: tuple[str, ...] = ("marlin", "triton_gemv")) -> list[dict]:
    """``python -m serving.bench`` decode at batch 1 and 4 under the 4 GiB cap (the speed session's flags, q/k/v and
    gate/up fused): GPTQModel's Marlin vs triton_gemv with the table tuned here. Waits up to ``wait_s`` for the
    checkpoint (serving_session.sh writes it in the background while the kernels are tuned)."""
    t = time.time()
    while not (Path(ckpt) / "quantize_config.json").is_file():
        if time.time() - t > wait_s:
            return [{"error": f"no checkpoint at {ckpt} after {wait_s:.0f} s"}]
        time.sleep(5)
    rows = []
    for backend in backends:
        dst = out_dir / f"engine_{backend}.json"
        cmd = [sys.executable, "-m", "serving.bench", "--model", ckpt, "--gptq-backend", backend, *ENGINE_FLAGS,
               "--out", str(dst)]
        env = {**os.environ, "SERVING_W4A16_CONFIGS": str(table_path)}
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        row = {"backend": backend, "rc": rc, "s": round(time.time() - t, 1), "cmd": " ".join(cmd[1:])}
        if rc == 0 and dst.is_file():
            row["report"] = json.loads(dst.read_text()).get("engine")
        else:
            row["stderr_tail"] = (err or "")[-2000:]
        rows.append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"})[:2000])
    return rows


def summary(stack: list[dict]) -> dict:
    """{rows: {backend: % of copy bandwidth}} from the stack rows, for reading at a glance."""
    out: dict = {}
    for r in stack:
        if "batch" in r:
            out.setdefault(str(r["batch"]), {})[r["backend"]] = r["pct_of_copy_bw"]
    return out


def _meta(res: dict) -> dict:
    return {k: res.get(k) for k in ("device", "torch", "triton", "copy_bandwidth_GBps", "grid")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--grid", choices=["quick", "full"], default="quick")
    ap.add_argument("--budget-s", type=float, default=120, help="wall-clock limit of the timing sweep")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--backends", default="v1,v2,ours,fp16,tinygemm,marlin")
    ap.add_argument("--old-table", default=str(w4a16.CONFIG_TABLE), help="kernel 1's tuned table (v1)")
    ap.add_argument("--retune-v1", action="store_true", help="search kernel 1's grid too (shares the budget)")
    ap.add_argument("--engine-ckpt", default=None, help="a LLaMA-7B-shaped GPTQ folder: also run serving.bench")
    ap.add_argument("--engine-wait-s", type=float, default=240, help="how long to wait for --engine-ckpt")
    ap.add_argument("--engine-timeout-s", type=float, default=300, help="limit of each serving.bench run")
    ap.add_argument("--engine-backends", default="marlin,triton_gemv", help="serving.bench --gptq-backend values")
    ap.add_argument("--table", default=None, help="use this tuned table (w4a16_configs.json) instead of tuning")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny shapes, Triton's interpreter")
    ap.add_argument("--engine-only", action="store_true", help="only the serving.bench runs (--engine-ckpt, --table)")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.engine_only:
        if not (args.engine_ckpt and args.table):
            ap.error("--engine-only needs --engine-ckpt and --table")
        rows = engine_runs(args.engine_ckpt, Path(args.table), out_dir, args.engine_wait_s, args.engine_timeout_s,
                           tuple(args.engine_backends.split(",")))
        dst = out_dir / f"w4a16_engine_{args.engine_backends.replace(',', '_')}.json"
        dst.write_text(json.dumps({"table": args.table, "engine": rows}, indent=1))
        print(json.dumps(rows))
        return 0 if all(r.get("rc") == 0 for r in rows) else 1
    batches = [int(b) for b in args.batches.split(",")]
    res: dict = {"torch": torch.__version__, "layers": args.layers, "grid": args.grid}
    # v1: kernel 1 only (entries of another kernel in the file are left out: that is what "old" means here)
    old = {k: c for k, c in w4a16.load_config_table(args.old_table).items() if c.kernel == 1}

    def flush():
        (out_dir / "w4a16.json").write_text(json.dumps(res, indent=1))

    if args.smoke or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        shapes = [(name, k // 16, n // 64) for name, k, n in SHAPES]
        res.update(device="cpu (TRITON_INTERPRET=1, smoke)", copy_bandwidth_GBps=None)
        batches = batches[:2]
        tables, res["tuning"] = tune(shapes, batches, args.grid, 300, "cpu", 132, 1.0, smoke=True, old_table=old)
        res["check"] = [dict(c, table=label) for label in ("v1", "v2") for c in
                        check(shapes, batches, tables[label], "cpu")]
        table = tables["ours"]
    else:
        import triton

        dev = "cuda"
        props = torch.cuda.get_device_properties(0)
        bw = copy_bandwidth(dev)
        res.update(device=torch.cuda.get_device_name(), sms=props.multi_processor_count, triton=triton.__version__,
                   copy_bandwidth_GBps=round(bw / 1e9, 1), old_table=args.old_table)
        if args.table:  # a second call (e.g. only --backends marlin) reuses the first call's table
            table = w4a16.load_config_table(args.table)
            tables = {"v1": old, "v2": {k: c for k, c in table.items() if c.kernel in (2, 3)}, "ours": table}
            res["tuning"] = {"loaded": args.table, "configs": len(table)}
        else:
            keys = {_compile_key(c, m) for _, k, n in SHAPES for m in batches
                    for kern in ((1, 2) if args.retune_v1 else (2,))
                    for c in candidates(n, k, m, args.grid, props.multi_processor_count, kernel=kern)}
            keys |= {_compile_key(old.get(w4a16.config_key(n, k, w4a16.bucket(m))) or w4a16.default_config(n, k, m),
                                  m) for _, k, n in SHAPES for m in batches}
            try:
                res["precompile"] = precompile(keys, args.workers)
            except Exception as e:  # noqa: BLE001 -- falls back to compiling during the sweep
                res["precompile"] = {"error": repr(e)[:300]}
            log("precompile", res["precompile"])
            tables, res["tuning"] = tune(SHAPES, batches, args.grid, args.budget_s, dev, props.multi_processor_count,
                                         bw, smoke=False, old_table=old, retune_v1=args.retune_v1)
            table = tables["ours"]
        w4a16.save_config_table(out_dir / "w4a16_configs.json", table, _meta(res))
        flush()
        res["check"] = [dict(c, table=label) for label in ("v1", "v2") for c in check(SHAPES, batches, tables[label],
                                                                                       dev)]
        flush()
        res["sass"] = sass_of_chosen(table, batches)
        flush()
        cache: dict = {}
        builders = {"v1": lambda: stack_ours(args.layers, tables["v1"], dev, cache),
                    "v2": lambda: stack_ours(args.layers, tables["v2"], dev, cache),
                    "ours": lambda: stack_ours(args.layers, table, dev, cache),
                    "fp16": lambda: stack_fp16(args.layers, dev),
                    "tinygemm": lambda: stack_tinygemm(args.layers, dev),
                    "marlin": lambda: stack_marlin(args.layers, dev)}
        res["stack"] = []
        names = args.backends.split(",")
        for i, name in enumerate(names):
            res["stack"] += time_stack(name, builders[name], batches, bw, dev)
            if name in ("v1", "v2", "ours") and not set(names[i + 1:]) & {"v1", "v2", "ours"}:
                cache.clear()  # the next backends build their own 3.4 GB
            res["summary"] = summary(res["stack"])
            flush()
    table_path = out_dir / "w4a16_configs.json"
    w4a16.save_config_table(table_path, table, _meta(res))
    if args.engine_ckpt:
        res["engine"] = engine_runs(args.engine_ckpt, table_path, out_dir, args.engine_wait_s, args.engine_timeout_s,
                                    tuple(args.engine_backends.split(",")))
    flush()
    print(json.dumps(res))
    return 0 if all(c["ok"] for c in res["check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
