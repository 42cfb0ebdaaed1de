"""GPU benchmark: paged decode attention, the Triton kernel against the torch paged path and today's dense SDPA.

LLaMA-7B-shaped attention (32 query heads, head_dim 128; 32 kv heads and a GQA case with 8), contexts
512/1024/2048/4096, batch 1/4/8, fp16 and int8 caches in blocks of 16, every row at the full context. Each method
runs inside a CUDA graph that replays it over ``replicas`` disjoint copies of the cache (different physical
blocks, about 512 MiB of K/V a replay, 10x the H200's 50 MB L2), so the time is that of reading K/V from HBM:

- ``triton``: ``serving.kernels.paged_attention`` with the tuned launch (splits x block_n x num_warps searched, and
  tl.dot against multiply-adds for MHA);
  ``triton_default`` is the same kernel with ``default_config`` (what a runner gets without the table);
- ``torch_paged``: the torch reference (gather the blocks, SDPA), the CPU path, also graph safe;
- ``dense_sdpa``: today's engine over a contiguous ``[batch, kv_heads, max_len, head_dim]`` cache (dequantize
  int8 in torch, SDPA with a mask).

GB/s counts the K/V (and int8 scales) bytes a call must read. The Triton output is checked against the torch
reference in every case, and a captured graph is replayed after its block tables and lengths change. ``write_kv``
(one decode step's K/V into the blocks, int8-quantized) is timed too: torch index_put against the one Triton launch,
and compared byte for byte. FlashInfer is not a peer here (see the README: its wheel alone is larger than what one
GPU call carries, it JIT-builds with nvcc, and it has no int8 cache with per-token scales).

Writes ``$OUT/paged_attention.json`` (all results, rewritten after every case so a cut-short run still reports)
and ``$OUT/paged_attention_tuning.json`` (the launch table; committed as ``commit_tuning_as``, e.g.
``serving/kernels/tuning/nvidia-h200.json``, the kernel uses it on that GPU), and prints the results JSON.

    python tests/gpu/bench_paged_attention.py                 # the GPU run (~3 min on the H200)
    python tests/gpu/bench_paged_attention.py --smoke --out /tmp/pa   # CPU smoke of the script (interpreter)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MIB = 1 << 20
BLOCK_SIZE = 16
REPLAY_BYTES = 512 * MIB  # K/V read per graph replay: far above L2 so every replica comes from HBM
MAX_REPLICAS = 256  # small cases: 256 launches a graph (b1, GQA, ctx 512 reads 2 MiB a call)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
BLOCK_N = (32, 64)
WARPS = (4, 8)
# outputs are averages of V (|V| <= 127 * 0.021 for int8 here, ~4 for fp16 randn): fp16 rounding stays far below
MATCH_ATOL = 2e-2
MAX_PROGRAMS_PER_SM = 8  # more splits than 8 programs per SM only add merge work


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON files (default $OUT)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    p.add_argument("--budget-s", type=float, default=140.0,
                   help="after this many seconds the remaining cases skip the autotune (default config only)")
    return p.parse_args()


def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(heads=[(4, 4), (4, 2)], head_dim=64, contexts=[40, 100], batches=[1, 2],
                    kv=["fp16", "int8"], splits=(1, 2, 4), block_n=(16, 32), warps=(4,))
    return dict(heads=[(32, 32), (32, 8)], head_dim=128, contexts=[512, 1024, 2048, 4096], batches=[1, 4, 8],
                kv=["fp16", "int8"], splits=SPLITS, block_n=BLOCK_N, warps=WARPS)


class Timer:
    """Microseconds per call of ``fn(r)`` over replicas r: a CUDA graph of all replicas, replayed (GPU), or plain
    calls (CPU smoke: the numbers mean nothing there)."""

    def __init__(self, device: torch.device, replicas: int):
        self.device, self.replicas = device, replicas

    def __call__(self, fn, reps: int = 10) -> float:
        if self.device.type != "cuda":
            t = time.perf_counter()
            for r in range(self.replicas):
                fn(r)
            return (time.perf_counter() - t) * 1e6 / self.replicas
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: compiles, allocator
            for r in range(self.replicas):
                fn(r)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for r in range(self.replicas):
                fn(r)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / (reps * self.replicas)
        del graph
        return us


def copy_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return round(2 * 10 * a.numel() / (time.perf_counter() - t) / 1e9, 1)


class Case:
    """Random K/V for ``replicas`` copies of a batch at full context: a paged pool (shuffled blocks, one table per
    replica) and the same values as dense per-replica caches."""

    def __init__(self, device, heads, kv_heads, head_dim, batch, ctx, kv, replicas, seed=0):
        torch.manual_seed(seed)
        self.b, self.nh, self.kvh, self.hd, self.ctx = batch, heads, kv_heads, head_dim, ctx
        self.dtype, self.int8 = torch.float16, kv == "int8"
        if device.type != "cuda":
            self.dtype = torch.float32  # CPU SDPA and the interpreter: fp32 is the honest CPU dtype
        nb = math.ceil(ctx / BLOCK_SIZE)
        total = replicas * batch * nb + 1
        shape = (total, kv_heads, BLOCK_SIZE, head_dim)
        if self.int8:
            self.kc = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
            self.vc = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
            self.ks = (torch.rand((*shape[:3], 1), device=device) * 0.02 + 1e-3).to(self.dtype)
            self.vs = (torch.rand((*shape[:3], 1), device=device) * 0.02 + 1e-3).to(self.dtype)
        else:
            self.kc = torch.randn(shape, device=device).to(self.dtype)
            self.vc = torch.randn(shape, device=device).to(self.dtype)
            self.ks = self.vs = None
        perm = torch.randperm(total - 1, device=device)[: replicas * batch * nb].view(replicas, batch, nb)
        self.tables = [perm[r].to(torch.int32).contiguous() for r in range(replicas)]
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, heads, head_dim, device=device).to(self.dtype)
        self.scale = head_dim ** -0.5
        elt = 1 if self.int8 else self.kc.element_size()
        self.bytes = batch * ctx * kv_heads * 2 * (head_dim * elt + (self.ks.element_size() if self.int8 else 0))
        self.valid = (torch.arange(ctx, device=device)[None, :] < self.lens[:, None]).view(batch, 1, 1, ctx)
        self.dense = [self._dense(r) for r in range(replicas)]

    def _dense(self, r: int):
        def gather(c):
            x = c[self.tables[r].long()]  # [b, nb, kvh, bs, d] -> [b, kvh, ctx, d], as today's slot cache
            return x.transpose(1, 2).reshape(self.b, self.kvh, -1, x.shape[-1])[:, :, : self.ctx].contiguous()
        if self.int8:
            return gather(self.kc), gather(self.vc), gather(self.ks), gather(self.vs)
        return gather(self.kc), gather(self.vc), None, None

    def paged(self, r: int, **kw) -> torch.Tensor:
        from serving.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention(self.q, self.kc, self.vc, self.ks, self.vs, self.tables[r], self.lens,
                                      self.scale, self.ctx, **kw)

    def dense_sdpa(self, r: int) -> torch.Tensor:
        """Today's ``serving.model._cache_attend`` read: dequantize the contiguous slots in torch, SDPA."""
        k, v, ks, vs = self.dense[r]
        if ks is not None:
            k, v = k.to(self.dtype) * ks, v.to(self.dtype) * vs
        qg = self.q.view(self.b, self.kvh, self.nh // self.kvh, self.hd)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=self.valid, scale=self.scale).reshape(
            self.b, self.nh, self.hd)


def candidates(case: Case, space: dict, sm: int):
    from serving.kernels.paged_attention_tuning import MAX_FMA_GROUP, DecodeConfig, split_plan

    seen = set()
    for block_n in space["block_n"]:
        for splits in space["splits"]:
            eff = split_plan(case.ctx, DecodeConfig(num_splits=splits, block_n=block_n))
            if eff in seen or case.b * case.kvh * eff[1] > MAX_PROGRAMS_PER_SM * max(sm, 1) and eff[1] > 1:
                continue
            seen.add(eff)
            for warps in space["warps"]:
                # multiply-adds only at block_n 32: at 64 they hold 168-255 registers and spill with int8 (sm_90)
                fma = case.nh // case.kvh <= MAX_FMA_GROUP and block_n == min(space["block_n"])
                for use_dot in (True, False) if fma else (True,):
                    yield DecodeConfig(num_splits=eff[1], block_n=block_n, num_warps=warps, use_dot=use_dot)


def entry(us: float, case: Case, **extra) -> dict:
    return {"us": round(us, 2), "gbps": round(case.bytes / (us * 1e-6) / 1e9, 1), **extra}


def run_case(device, sm, space, heads, kvh, batch, ctx, kv, tune: bool) -> tuple[dict, object]:
    from dataclasses import asdict

    from serving.kernels.paged_attention_tuning import TunedShape, default_config

    per_call = batch * ctx * kvh * 2 * space["head_dim"] * (1 if kv == "int8" else 2)
    replicas = 1 if device.type != "cuda" else max(2, min(MAX_REPLICAS, math.ceil(REPLAY_BYTES / per_call)))
    case = Case(device, heads, kvh, space["head_dim"], batch, ctx, kv, replicas)
    timer = Timer(device, replicas)
    ref = case.paged(0, backend="torch")
    default = default_config(batch, kvh, ctx, sm)
    from triton.errors import TritonError

    tried, failed = {}, {}
    for cfg in (candidates(case, space, sm) if tune else [default]):
        try:
            tried[cfg] = timer(lambda r, c=cfg: case.paged(r, backend="triton", config=c))
        except (RuntimeError, TritonError) as e:  # e.g. out of shared memory: that launch is not a candidate
            failed[str(asdict(cfg))] = repr(e)[:300]
    if not tried:
        raise RuntimeError(f"no launch configuration ran: {failed}")
    best = min(tried, key=tried.get)
    if default not in tried:
        tried[default] = timer(lambda r: case.paged(r, backend="triton", config=default))
    out = case.paged(0, backend="triton", config=best)
    dense_out = case.dense_sdpa(0)
    methods = {
        "triton": entry(tried[best], case, config=asdict(best)),
        "triton_default": entry(tried[default], case, config=asdict(default)),
        "torch_paged": entry(timer(lambda r: case.paged(r, backend="torch")), case),
        "dense_sdpa": entry(timer(case.dense_sdpa), case),
    }
    result = {
        "heads": heads, "kv_heads": kvh, "batch": batch, "context": ctx, "kv": kv, "dtype": str(case.dtype)[6:],
        "kv_mib_per_call": round(case.bytes / MIB, 2), "replicas": replicas, "tuned": tune,
        "configs_tried": len(tried), "configs_failed": failed, "methods": methods,
        "triton_vs_dense_speedup": round(methods["dense_sdpa"]["us"] / methods["triton"]["us"], 2),
        "triton_vs_torch_paged_speedup": round(methods["torch_paged"]["us"] / methods["triton"]["us"], 2),
        "max_abs_err_triton_vs_torch": float((out.float() - ref.float()).abs().max()),
        "max_abs_err_torch_vs_dense": float((ref.float() - dense_out.float()).abs().max()),
    }
    shape = TunedShape(batch=batch, kv_heads=kvh, group=heads // kvh, max_context=ctx, int8=kv == "int8",
                       config=best, us=round(tried[best], 2))
    return result, shape


def bf16_check(device) -> dict:
    """One bf16 case (the serving dtype of bf16 models): Triton against the torch reference."""
    from serving.kernels.paged_attention import paged_decode_attention

    case = Case(device, 32 if device.type == "cuda" else 4, 8 if device.type == "cuda" else 2,
                128 if device.type == "cuda" else 64, 3, 777, "fp16", 1)
    if device.type == "cuda":
        for name in ("kc", "vc", "q"):
            setattr(case, name, getattr(case, name).to(torch.bfloat16))
    case.lens = torch.tensor([777, 1, 300], dtype=torch.int32, device=device)
    args = (case.q, case.kc, case.vc, None, None, case.tables[0], case.lens, case.scale, 777)
    err = (paged_decode_attention(*args, backend="triton").float() - paged_decode_attention(
        *args, backend="torch").float()).abs().max()
    return {"dtype": str(case.q.dtype)[6:], "lens": [777, 1, 300], "max_abs_err_triton_vs_torch": float(err)}


def write_kv_bench(device, space) -> list[dict]:
    """``write_kv`` of one decode step's tokens (one per row) per layer: torch index_put vs the Triton launch,
    in a graph of 256 calls (launch-bound: a few KiB a call); and whether both write the same bytes."""
    from serving.kernels.paged_attention import write_kv

    rows = []
    kvh, hd = space["heads"][0][1], space["head_dim"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for kv in space["kv"]:
        for batch in (1, 8):
            shape = (64 * batch, kvh, BLOCK_SIZE, hd)
            caches = {}
            for backend in ("torch", "triton"):
                kc = torch.zeros(shape, dtype=torch.int8 if kv == "int8" else dtype, device=device)
                scales = [torch.zeros((*shape[:3], 1), dtype=dtype, device=device) for _ in range(2)]
                caches[backend] = (kc, torch.zeros_like(kc), *(scales if kv == "int8" else (None, None)))
            k = torch.randn(batch, kvh, hd, device=device).to(dtype)
            v = torch.randn(batch, kvh, hd, device=device).to(dtype)
            slots = torch.randperm(shape[0] * BLOCK_SIZE, device=device)[:batch]
            timer = Timer(device, 256 if device.type == "cuda" else 1)
            row = {"kv": kv, "batch": batch, "kv_heads": kvh}
            for backend, c in caches.items():
                def call(r, c=c, b=backend, k=k, v=v, slots=slots):
                    write_kv(k, v, *c, slots, backend=b)
                row[f"{backend}_us"] = round(timer(call), 2)
            row["bit_exact"] = all(a is None or torch.equal(a, b) for a, b in zip(caches["torch"], caches["triton"],
                                                                                   strict=True))
            rows.append(row)
    return rows


def rope_write_bench(device, space) -> list[dict]:
    """A decode step's rotary + K/V write per layer (32 query heads over the space's kv heads): the torch piece
    eager (``rope_write_kv_ref``: rotation, quantization, index_puts), the same piece through torch.compile on
    CUDA (what ``engine.compile`` ran before the kernel), and the one Triton launch (``rope_write_kv``), in a
    graph of 256 calls each; whether the fused kernel's K/V agree with the torch piece's (int8 within 1 step)."""
    from serving.kernels.paged_attention import rope_write_kv
    from serving.kernels.paged_attention_ref import rope_write_kv_ref

    rows = []
    kvh, hd = space["heads"][0][1], space["head_dim"]
    nh = 32
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    variants = {"torch": rope_write_kv_ref, "triton": lambda *a: rope_write_kv(*a, backend="triton")}
    if device.type == "cuda":
        variants["torch_compiled"] = torch.compile(rope_write_kv_ref, dynamic=False)
    for kv in space["kv"]:
        for batch in (1, 8):
            shape = (64 * batch, kvh, BLOCK_SIZE, hd)
            qkv = torch.randn(batch, (nh + 2 * kvh) * hd, device=device).to(dtype)
            q, k, v = qkv.split([nh * hd, kvh * hd, kvh * hd], dim=1)
            pos = torch.randint(0, 4096, (batch,), device=device).float()
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
            emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            slots = torch.randperm(shape[0] * BLOCK_SIZE, device=device)[:batch]
            timer = Timer(device, 256 if device.type == "cuda" else 1)
            row = {"kv": kv, "batch": batch, "heads": nh, "kv_heads": kvh}
            caches = {}
            for name, fn in variants.items():
                kc = torch.zeros(shape, dtype=torch.int8 if kv == "int8" else dtype, device=device)
                scales = [torch.zeros((*shape[:3], 1), dtype=dtype, device=device) for _ in range(2)]
                c = (kc, torch.zeros_like(kc), *(scales if kv == "int8" else (None, None)))
                caches[name] = c

                def call(r, c=c, fn=fn, args=(q, k, v, cos, sin), slots=slots):
                    fn(*args, *c, slots)
                try:
                    row[f"{name}_us"] = round(timer(call), 2)
                except Exception as e:  # noqa: BLE001 -- a variant that fails is reported, not fatal
                    row[f"{name}_error"] = repr(e)[:300]
            a, b = caches["torch"], caches["triton"]
            row["k_max_diff"] = float((a[0].float() - b[0].float()).abs().max())
            row["v_equal"] = bool(torch.equal(a[1], b[1]))
            rows.append(row)
    return rows


def graph_check(device) -> dict:
    """Graph safety: capture each path once, then change the static block tables and context lengths in place
    (other blocks, shorter and longer rows, an empty row) and replay; the outputs must follow the new inputs."""
    if device.type != "cuda":
        return {"skipped": "no CUDA graphs on CPU"}
    from serving.kernels.paged_attention import DecodeConfig, paged_decode_attention

    case = Case(device, 32, 8, 128, 4, 2048, "int8", 2)
    tables, lens = case.tables[0].clone(), case.lens.clone()
    out = {}
    for name, kw in (("triton_split", {"backend": "triton", "config": DecodeConfig(num_splits=8)}),
                     ("triton_direct", {"backend": "triton", "config": DecodeConfig(num_splits=1)}),
                     ("torch", {"backend": "torch"})):
        def call(kw=kw):
            return paged_decode_attention(case.q, case.kc, case.vc, case.ks, case.vs, tables, lens, case.scale,
                                          2048, **kw)
        tables.copy_(case.tables[0])
        lens.fill_(2048)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = call()
        tables.copy_(case.tables[1])
        lens.copy_(torch.tensor([2048, 1, 0, 1000], dtype=torch.int32, device=device))
        graph.replay()
        fresh = paged_decode_attention(case.q, case.kc, case.vc, case.ks, case.vs, case.tables[1].clone(),
                                       lens.clone(), case.scale, 2048, backend="torch")
        out[name] = float((static.float() - fresh.float()).abs().max())
    return {"max_abs_err_replay_vs_eager": out, "ok": all(e < MATCH_ATOL for e in out.values())}


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda":
        if not args.smoke:
            raise SystemExit("no CUDA device: run with --smoke for the CPU check of this script")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (by the kernel module)
    import triton
    from triton.errors import TritonError

    from serving.kernels.paged_attention import DecodeTuning, sm_count
    from serving.kernels.paged_attention_tuning import device_slug

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sm = sm_count(device)
    space = shapes(args.smoke)
    t0 = time.perf_counter()
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke, interpreter)",
        "sm_count": sm, "torch": torch.__version__, "triton": triton.__version__, "block_size": BLOCK_SIZE,
        "head_dim": space["head_dim"], "copy_gbps": copy_gbps(device),
        "flashinfer": {"included": False, "reason": "flashinfer-python 0.7.4's wheel is 101 MB (over the 64 MiB a "
                       "GPU call carries) and JIT-builds its kernels with nvcc; it has no int8 KV with per-token "
                       "scales (fp16/bf16/fp8 only)"},
        "cases": [], "checks": {},
    }
    tuning = DecodeTuning(device=results["device"])
    results["commit_tuning_as"] = f"serving/kernels/tuning/{device_slug(results['device'])}.json"
    path = out / "paged_attention.json"
    for kv in space["kv"]:
        for heads, kvh in space["heads"]:
            for batch in space["batches"]:
                for ctx in space["contexts"]:
                    tune = time.perf_counter() - t0 < args.budget_s
                    try:
                        result, shape = run_case(device, sm, space, heads, kvh, batch, ctx, kv, tune)
                        tuning.entries.append(shape)
                    except (RuntimeError, ValueError, TritonError) as e:  # one case's failure keeps the others
                        result = {"heads": heads, "kv_heads": kvh, "batch": batch, "context": ctx, "kv": kv,
                                  "tuned": tune, "error": repr(e)[:1000], "methods": {}}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the case's pool and graphs are gone: give the next its room
                    results["cases"].append(result)
                    results["wall_s"] = round(time.perf_counter() - t0, 1)
                    path.write_text(json.dumps(results, indent=1))
                    print(f"[{results['wall_s']:6.1f}s] {kv} {heads}/{kvh} b{batch} ctx{ctx}: "
                          + (result.get("error") or ", ".join(f"{k} {v['us']}us {v['gbps']}GB/s"
                                                              for k, v in result["methods"].items())),
                          file=sys.stderr, flush=True)
    for name, fn in (("bf16", lambda: bf16_check(device)), ("graph", lambda: graph_check(device)),
                     ("write_kv", lambda: write_kv_bench(device, space)),
                     ("rope_write", lambda: rope_write_bench(device, space))):
        try:
            results["checks"][name] = fn()
        except (RuntimeError, ValueError, TritonError) as e:
            results["checks"][name] = {"error": repr(e)[:1000]}
    results["tuned_all"] = all(c["tuned"] and "error" not in c for c in results["cases"])
    results["all_outputs_match"] = all(c.get("max_abs_err_triton_vs_torch", 1.0) < MATCH_ATOL
                                       for c in results["cases"]) and results["checks"]["graph"].get("ok", True)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    tuning.save(out / "paged_attention_tuning.json")
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
