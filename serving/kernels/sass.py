"""Compile the W4A16 GEMV for a GPU target without a GPU and read its SASS: registers, local memory (spills)
and instructions per weight element in the main loop. Triton's wheel carries ptxas and cuobjdump, so this runs
on the CPU machine (with its own triton; the GPU machine's may schedule differently).

    python -m serving.kernels.sass [--arch 90] [--rows 1] [--block-n 64] [--num-warps 4] [--dot] [--prefetch]
                                   [--kernel 2 --unroll 2 | --kernel 3 --dot] [--act-order] [--group-j 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

from serving.kernels.w4a16 import GEMV2_UNSPECIALIZED, GEMV_UNSPECIALIZED, GemvConfig

SIGNATURE = {"x_ptr": "*fp16", "w_ptr": "*i32", "sz_ptr": "*fp16", "perm_ptr": "*i32", "out_ptr": "*fp16",
             "part_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "K8": "i32",
             "chunks_per_group": "i32", "chunks_per_split": "i32", "stride_xm": "i32", "stride_om": "i32",
             "magic": "i32"}


def compile_gemv(cfg: GemvConfig, rows: int, group_j: int = 4, act_order: bool = False, split: bool = False,
                 arch: int = 90):
    """The compiled kernel (Triton's CompiledKernel) for ``cfg`` at ``rows`` rows, pointers and N/K/K8 16-aligned
    as torch allocations of the 7B shapes are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from serving.kernels import _w4a16_triton as kernels

    if cfg.kernel == 3:
        fn = triton.jit(kernels.w4a16_gemv3_kernel, do_not_specialize=GEMV2_UNSPECIALIZED)
        const = {"BLOCK_M": max(16, rows) if cfg.dot else rows, "BLOCK_N": cfg.block_n, "GROUP_J": group_j,
                 "HAS_PERM": act_order, "SPLIT": split, "DOT": cfg.dot}
        specialized = ("N", "K", "K8", "stride_xm", "stride_om")
    elif cfg.kernel == 2:
        fn = triton.jit(kernels.w4a16_gemv2_kernel, do_not_specialize=GEMV2_UNSPECIALIZED)
        const = {"BLOCK_M": max(16, rows) if cfg.dot else rows, "BLOCK_N": cfg.block_n, "GROUP_J": group_j,
                 "HAS_PERM": act_order, "SPLIT": split, "SCALE_W": not cfg.dot and (cfg.scale_w or rows > 1),
                 "UNROLL": cfg.unroll, "DOT": cfg.dot, "FMA_ROWS": 0 if cfg.dot else rows}
        specialized = ("N", "K", "K8", "stride_xm", "stride_om")  # 16-divisible, as the 7B layers' are
    else:
        fn = triton.jit(kernels.w4a16_gemv_kernel, do_not_specialize=GEMV_UNSPECIALIZED)
        const = {"BLOCK_M": max(16, rows) if cfg.dot else rows, "BLOCK_N": cfg.block_n, "GROUP_J": group_j,
                 "HAS_PERM": act_order, "SPLIT": split, "SCALE_W": cfg.scale_w, "DOT": cfg.dot,
                 "PREFETCH": cfg.prefetch}
        specialized = ("N", "K", "K8")
    sig = {**SIGNATURE, **{k: "constexpr" for k in const}}
    names = list(sig)
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n in specialized]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass_stats(kernel, cfg: GemvConfig) -> dict:
    """Registers, local memory bytes, and the innermost loop's instruction count per weight element."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    loops = [(int(m.group(1), 16), addr) for addr, t in ins for m in [re.search(r"BRA (0x[0-9a-f]+)", t)]
             if m and int(m.group(1), 16) < addr]
    out = {"registers": int(re.search(r"REG:(\d+)", res).group(1)),
           "local_bytes": int(re.search(r"LOCAL:(\d+)", res).group(1))}
    if loops:
        a, b = max(loops, key=lambda ab: ab[1] - ab[0])  # the chunk loop is the longest one
        body = [t for ad, t in ins if a <= ad <= b]
        # weights per thread per loop iteration (kernel 2 unpacks ``unroll`` 256-input chunks per iteration)
        elems = cfg.block_n * 32 * 8 / (32 * cfg.num_warps) * (cfg.unroll if cfg.kernel == 2 else 1)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
        out.update(loop_instructions=len(body), instructions_per_weight=round(len(body) / elems, 2),
                   top=dict(ops.most_common(8)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--scale-w", action="store_true")
    ap.add_argument("--dot", action="store_true")
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--kernel", type=int, default=1)
    ap.add_argument("--unroll", type=int, default=1)
    ap.add_argument("--act-order", action="store_true", help="an act-order checkpoint's kernel (g_idx gather)")
    ap.add_argument("--group-j", type=int, default=4, help="32-input slices per group in a chunk (g128: 4)")
    a = ap.parse_args()
    cfg = GemvConfig(block_n=a.block_n, split_k=2 if a.split else 1, num_warps=a.num_warps, num_stages=1,
                     scale_w=a.scale_w, dot=a.dot, prefetch=a.prefetch, kernel=a.kernel, unroll=a.unroll)
    print(json.dumps({"config": cfg.__dict__, "rows": a.rows,
                      **sass_stats(compile_gemv(cfg, a.rows, a.group_j, a.act_order, a.split, a.arch), cfg)}))


if __name__ == "__main__":
    main()
