"""What single CUDA actions cost outside PyTorch's allocator, each in a fresh process at the 4 GB profile's
64-byte stack (nvidia-smi's per-process MiB, NVML, and the device's free bytes, less the allocator's growth).

The paged engine's first decode step adds about 70 MiB outside the allocator on the H200 (``MemoryReport.steps``,
``first_decode``), and local memory is ruled out. This names which of the actions that step takes for the first
time costs it, with the engine's allocator settings: a side stream (graph capture runs on one; torch's pool, a
raw cudaStreamCreate, work allocated on it), pinned host memory and an asynchronous copy, a CUDA
graph's capture and instantiation, Triton kernels loaded (one, then ten distinct ones: the per-module cost),
an Inductor-compiled function, the sampler's torch kernels (softmax, top-k, sort, cumsum, multinomial), and the
engine's own first-decode kernels: the Triton paged decode attention, the int8 lm_head's W8A16 kernel and the
Inductor-compiled decode pieces at 7B's shapes. ``--check`` runs those three on the CPU (Triton's interpreter, the
aot_eager backend) so a GPU call does not find a typo.

    python3 tests/gpu/outside_alloc_probe.py --out $OUT/outside_alloc.json   # GPU; ~3 s a candidate
    python3 tests/gpu/outside_alloc_probe.py --list                          # the candidates (any machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


if "--check" in sys.argv:  # Triton reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # module level, as Triton wants its kernels
    import triton
    import triton.language as tl

    @triton.jit
    def _add_kernel(x_ptr, n_el, BLOCK: tl.constexpr, ADD: tl.constexpr):
        off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = off < n_el
        tl.store(x_ptr + off, tl.load(x_ptr + off, mask=m) + ADD, mask=m)
except ImportError:
    _add_kernel = None


def run_triton(n: int, device: str = "cuda") -> None:
    """``n`` compilations of one kernel (distinct ``ADD`` constants: distinct modules loaded)."""
    import torch

    x = torch.zeros(4096, device=device)
    for add in range(1, n + 1):
        _add_kernel[(4,)](x, x.numel(), BLOCK=1024, ADD=add)
    assert x[0].item() == n * (n + 1) / 2, x[0].item()


def run_graph() -> None:
    import torch

    x = torch.zeros(4096, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x.add_(1)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()


def run_sampler() -> None:
    import torch

    logits = torch.randn(2, 32000, device="cuda")
    probs = torch.softmax(logits / 0.8, -1)
    top = torch.topk(probs, 50, -1)
    srt = torch.sort(probs, -1, descending=True)
    cdf = torch.cumsum(srt.values, -1)
    torch.multinomial(probs, 1)
    (cdf > 0.9).int().argmax(-1)
    top.values.sum().item()


def run_compile() -> None:
    import torch

    f = torch.compile(lambda t: torch.nn.functional.silu(t) * t + 1, dynamic=False)
    f(torch.randn(2, 4096, device="cuda", dtype=torch.float16)).sum().item()


def run_pinned() -> None:
    import torch

    h = torch.empty(64 * MIB, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
    d.copy_(h, non_blocking=True)


def run_paged_decode(device: str = "cuda", backend: str = "auto") -> None:
    """The engine's Triton decode attention (split + merge kernels) over an int8 cache, 7B heads, batch 2."""
    import torch

    from serving.kernels.paged_attention import paged_decode_attention

    dt = torch.float16 if device == "cuda" else torch.float32
    nb, h, bs, hd = 8, 32, 16, 128
    q = torch.randn(2, h, hd, device=device, dtype=dt)
    kc, vc = (torch.randint(-127, 127, (nb, h, bs, hd), dtype=torch.int8, device=device) for _ in range(2))
    ks, vs = (torch.full((nb, h, bs, 1), 0.01, dtype=dt, device=device) for _ in range(2))
    tables = torch.arange(8, dtype=torch.int32, device=device).view(2, 4).contiguous()
    lens = torch.tensor([60, 33], dtype=torch.int32, device=device)
    out = paged_decode_attention(q, kc, vc, ks, vs, tables, lens, hd ** -0.5, 64, backend=backend)
    assert out.shape == q.shape and torch.isfinite(out).all()


def run_w8a16(device: str = "cuda") -> None:
    """The int8 lm_head's Triton kernel at 7B's shape, 2 rows (its 125 MiB weight is the allocator's)."""
    import torch

    from serving.kernels.w8a16 import w8a16_linear

    dt = torch.float16 if device == "cuda" else torch.float32
    n, k = (32000, 4096) if device == "cuda" else (256, 128)
    w = torch.randint(-127, 127, (n, k), dtype=torch.int8, device=device)
    out = w8a16_linear(torch.randn(2, k, device=device, dtype=dt), w, torch.full((n,), 0.01, dtype=dt, device=device))
    assert out.shape == (2, n)


def run_decode_pieces(device: str = "cuda", backend: str = "inductor") -> None:
    """The engine's compiled decode pieces (``serving.runner.FUSED_PIECES``: RMSNorm, rotary + int8 KV write,
    residual + RMSNorm, SiLU gate) at 7B's shapes for batch 1 and 2, as ``LlamaRunner.compile_decode`` compiles
    them (``_decode_attend``, the torch attention path, is not used beside the Triton decode kernel)."""
    import torch

    from serving.runner import FUSED_PIECES

    dt = torch.float16 if device == "cuda" else torch.float32
    hid, inter, h, hd, nb, bs = 4096, 11008, 32, 128, 8, 16
    f = {n: torch.compile(fn, backend=backend, dynamic=False) for n, fn in FUSED_PIECES.items() if n != "attend"}
    kc, vc = (torch.zeros(nb, h, bs, hd, dtype=torch.int8, device=device) for _ in range(2))
    ks, vs = (torch.ones(nb, h, bs, 1, dtype=dt, device=device) for _ in range(2))
    w = torch.ones(hid, dtype=dt, device=device)
    for b in (2, 1):
        x = torch.randn(b, 1, hid, dtype=dt, device=device)
        f["attn_in"](x, w, 1e-6)
        cos, sin = torch.ones(b, 1, hd, dtype=dt, device=device), torch.zeros(b, 1, hd, dtype=dt, device=device)
        slots = torch.arange(b, dtype=torch.int64, device=device)
        f["rope_write"](x, x, x, cos, sin, slots, kc, vc, ks, vs, h, hd)
        f["mlp_in"](x, x, w, 1e-6)
        g = torch.randn(b, 1, inter, dtype=dt, device=device)
        f["gate"](g, g)


def run_stream_raw() -> None:
    """One stream from cudaStreamCreate (torch's ``torch.cuda.Stream()`` first fills its per-device pool)."""
    import ctypes

    from serving.memory import _libcudart

    rt = _libcudart()
    handle = ctypes.c_void_p()
    assert rt is not None and rt.cudaStreamCreate(ctypes.byref(handle)) == 0


def run_side_stream_work() -> None:
    """Tensors allocated and a kernel run on a side stream, as graph capture's warm-up does (the allocator keeps
    blocks per stream)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x = torch.empty(16 * MIB, dtype=torch.uint8, device="cuda")
        x.fill_(1)
    torch.cuda.current_stream().wait_stream(s)


CANDIDATES = {
    "control": lambda: None,
    "stream": lambda: __import__("torch").cuda.Stream(),
    "stream_raw": run_stream_raw,
    "side_stream_work": run_side_stream_work,
    "event": lambda: __import__("torch").cuda.Event(enable_timing=True).record(),
    "pinned_64mib_async_copy": run_pinned,
    "cuda_graph": run_graph,
    "triton_1": lambda: run_triton(1),
    "triton_10": lambda: run_triton(10),
    "inductor_compile": run_compile,
    "paged_decode_attention": run_paged_decode,
    "w8a16_lm_head": run_w8a16,
    "decode_pieces_inductor": run_decode_pieces,
    "sampler_ops": run_sampler,
}


def child(name: str, stack: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from serving.memory import process_gpu_mib, set_alloc_conf, set_cuda_stack_limit

    set_alloc_conf()  # the engine's allocator settings (expandable segments), before CUDA starts
    torch.zeros(1, device="cuda").add_(1)
    got = set_cuda_stack_limit(0, stack) if stack else None

    def read() -> tuple[int | None, int, int]:
        torch.cuda.synchronize()
        time.sleep(0.4)  # NVML's per-process figure trails
        return process_gpu_mib(0)[0], torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()

    nv0, free0, res0 = read()
    t = time.perf_counter()
    CANDIDATES[name]()
    s = time.perf_counter() - t
    nv1, free1, res1 = read()
    return {"candidate": name, "stack_limit": got, "nvml_before_mib": nv0, "nvml_after_mib": nv1,
            "nvml_delta_mib": None if nv0 is None or nv1 is None else nv1 - nv0,
            "outside_allocator_delta_mib": round(((free0 - free1) - (res1 - res0)) / MIB, 1),
            "allocator_reserved_delta_mib": round((res1 - res0) / MIB, 1), "s": round(s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--stack", type=int, default=64, help="cudaLimitStackSize set first (0: the default)")
    p.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    p.add_argument("--timeout-s", type=float, default=90)
    p.add_argument("--list", action="store_true")
    p.add_argument("--check", action="store_true", help="CPU: run the engine-kernel candidates' code (no memory read)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(CANDIDATES))
        return 0
    if a.check:
        sys.path.insert(0, str(ROOT))
        run_triton(3, "cpu")
        run_paged_decode("cpu", backend="triton")
        run_w8a16("cpu")
        run_decode_pieces("cpu", backend="aot_eager")
        print("ok")
        return 0
    if a.child:
        print(json.dumps(child(a.child, a.stack)))
        return 0
    names = [n for n in a.only.split(",") if n] or list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        p.error(f"--only: unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    rows = []
    for n in names:
        try:
            r = subprocess.run([sys.executable, __file__, "--child", n, "--stack", str(a.stack)], capture_output=True,
                               text=True, timeout=a.timeout_s, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
            last = (r.stdout.strip().splitlines() or [""])[-1]
            rows.append(json.loads(last) if r.returncode == 0 else {"candidate": n, "error": r.stderr[-800:]})
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            rows.append({"candidate": n, "error": str(e)[:300]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if a.out:  # written after every candidate: a call cut short keeps what it measured
            Path(a.out).write_text(json.dumps({"stack": a.stack, "rows": rows}, indent=1))
    print(json.dumps({"stack": a.stack, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
