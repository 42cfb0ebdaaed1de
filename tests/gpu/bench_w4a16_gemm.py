"""W4A16 prefill GEMMs on one GPU: serving/kernels/w4a16_gemm.py (Triton, tensor cores, no cuBLAS) over a small
config grid, next to the dequantize + cuBLAS path (w4a16.matmul_dequant) and fp16 cuBLAS on the dequantized
weight, at LLaMA-7B shapes and prefill-chunk row counts. Prints JSON; writes $OUT/w4a16_gemm.json.

    python tests/gpu/bench_w4a16_gemm.py [--rows 16,64,128,256]
    python tests/gpu/bench_w4a16_gemm.py --smoke     # CPU: tiny shapes under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.kernels import reference as ref  # noqa: E402
from serving.kernels import w4a16, w4a16_gemm  # noqa: E402

SHAPES = [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)]
CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 2)]  # block_n, num_warps, num_stages


def timed_us(fn, smoke: bool, reps: int = 20) -> float:
    fn()
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / reps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64,128,256")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    smoke = args.smoke
    dev = "cpu" if smoke else "cuda"
    shapes = [("tiny", 256, 96)] if smoke else SHAPES
    rows = [16, 40] if smoke else [int(r) for r in args.rows.split(",")]
    configs = CONFIGS[:2] if smoke else CONFIGS
    out: dict = {"device": torch.cuda.get_device_name() if not smoke else "cpu (interpreter)", "results": []}
    for name, k, n in shapes:
        t = ref.random_gptq(k, n, 128, False, False, seed=k + n)
        t = {key: (v.to(dev) if isinstance(v, torch.Tensor) else v) for key, v in t.items()}
        packed = w4a16.repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 128)
        w16 = w4a16.matmul_dequant(torch.eye(k, dtype=torch.float16, device=dev), packed).t().contiguous()
        for m in rows:
            x = torch.randn(m, k, dtype=torch.float16, device=dev)
            want = F.linear(x.float(), w16.float())
            row = {"shape": name, "k": k, "n": n, "rows": m}
            best = None
            for bn, nw, ns in configs:
                got = w4a16_gemm.matmul(x, packed, block_n=bn, num_warps=nw, num_stages=ns)
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                us = timed_us(functools.partial(w4a16_gemm.matmul, x, packed, block_n=bn, num_warps=nw, num_stages=ns),
                              smoke)
                row[f"ours_bn{bn}_w{nw}_s{ns}_us"] = round(us, 1)
                row[f"ours_bn{bn}_w{nw}_s{ns}_err"] = err
                if best is None or us < best[0]:
                    best = (us, f"bn{bn}_w{nw}_s{ns}")
            row["ours_best_us"], row["ours_best"] = round(best[0], 1), best[1]
            row["dequant_cublas_us"] = round(timed_us(functools.partial(w4a16.matmul_dequant, x, packed), smoke), 1)
            row["fp16_cublas_us"] = round(timed_us(functools.partial(F.linear, x, w16), smoke), 1)
            row["ours_vs_dequant"] = round(row["dequant_cublas_us"] / row["ours_best_us"], 2)
            row["ours_tflops"] = round(2 * m * k * n / row["ours_best_us"] / 1e6, 1)
            print(json.dumps(row), file=sys.stderr, flush=True)
            out["results"].append(row)
    text = json.dumps(out, indent=1)
    print(text)
    dst = Path(os.environ.get("OUT", "/tmp")) / "w4a16_gemm.json"
    dst.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
