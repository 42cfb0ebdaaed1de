"""W4A16 decode GEMV for GPTQ 4-bit weights: a split-K Triton kernel for 1 to 8 rows, and a dequantize
kernel that feeds cuBLAS for longer inputs (prefill).

Layout, built once at load by ``repack`` from the standard GPTQ tensors (the checkpoint on disk stays standard):

* ``weight`` int32 [N, Kp/8], one row per output: every program reads whole rows of its N tile, 128 bytes (one
  cache line, 16-byte vectors per thread) per 256 inputs. K is padded to Kp, a multiple of 256.
* Inside each 256-input chunk, nibble j of word i holds input ``32*j + i``: nibble j of a 32-word tile covers
  32 consecutive inputs, so the activations for it are one contiguous vector and (for groups of 32 or more)
  one scale and zero point per row.
* ``scale_zero`` fp16 [Gp, N, 2]: the scale and the zero point of a group side by side (one 4-byte load).
* act-order (``g_idx`` not sorted): the input rows are sorted by group at load; the kernel reads the
  activations through that permutation, so no reordering kernel runs per call.

Dequantizing in registers without an int-to-float conversion (I2F runs at a fraction of the FMA rate on
Hopper): ``(word & 0xF << 4e) | 0x4B000000`` is the float ``2**23 + q * 16**e`` for e <= 4 (the nibble stays in
the 23-bit mantissa), so one LOP3 and one FADD give ``(q - z) * 16**e`` exactly, the 16**-e is folded into the
activations, and nibbles 5..7 come from one shift of the word by 12. The scale is applied per group, after the
sum over its inputs (``scale_w=False``), or per weight (``scale_w=True``: cheaper in registers at 4-8 rows).
With ``dot=True`` the exact integers ``q - z`` go to ``tl.dot`` in the activations' dtype (rows padded to 16):
tensor cores for the multiply-adds, CUDA cores only for the unpacking. The tuner picks per shape and row bucket.

Split-K: programs of one N tile each reduce a slice of K into an fp32 workspace; the last to finish (an
atomic counter per tile) sums the slices in a fixed order (deterministic), writes the output and resets the
counter, so no memset or second kernel runs per call (inside a CUDA graph each is a node of its own).

Two GEMV kernels share the layout and the split-K fixup; ``GemvConfig.kernel`` picks one per (shape, row bucket)
in the tuned table. Kernel 2 (``w4a16_gemv2_kernel``) ORs nibble e with the float ``2**(23-4e)`` instead, so the
FADD gives ``q - z`` at unit scale (no ``16**-e`` on the activations or, for ``tl.dot``, on the weights), keeps
one 2-D accumulator per row instead of 3-D tiles, and can load two chunks per iteration (``unroll``). Kernel 3
(``w4a16_gemv3_kernel``) unpacks a word's two 16-bit halves at once: ``(word & 0x000F000F << 4e) | 0x64006400``
is the fp16 pair ``1024 + q * 16**e``, two weights per 32-bit instruction, dequantized with packed fp16
arithmetic and fed to the tensor cores with the weight tile in registers (sm_90 wgmma); with ``dot=False`` (one
row only) it multiplies with packed fp16 FMAs instead, four products a column per chunk before fp32.

Kernels are wrapped with ``triton.jit`` at first use, not at import, so ``TRITON_INTERPRET=1`` set by a test
(or a CPU run) after import still selects Triton's interpreter.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serving.kernels.reference import unpack_cols, unpack_rows

CHUNK = 256  # inputs per 32-word tile row
MAX_ROWS = 8  # the GEMV kernel handles 1..8 rows; longer inputs take the dequantize + cuBLAS path
MAX_SPLIT = 16
# The dequantize path writes at most this many fp16 elements at a time (8 MiB: at K=4096, 1024 outputs),
# what the activation reserve of a 4 GiB replica can hold next to the CUDA graph pool.
DEQUANT_CHUNK_ELEMS = 4 * 1024 * 1024
CONFIG_TABLE = Path(__file__).with_name("w4a16_configs.json")
# 2**23 as float bits, passed as a run-time argument rather than written in the kernel: with both the magic and
# the nibble mask as constants ptxas re-materialized a mask with a MOV before every LOP3 (6.0 -> 5.4 SASS
# instructions per weight at one row once the magic lives in a register)
MAGIC = 0x4B000000


class KernelError(Exception):
    """A GPTQ layer this kernel cannot take (bits, group size, g_idx layout) or a bad call."""


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    scale_w: bool = False
    dot: bool = False  # several rows through tl.dot (rows padded to 16) instead of CUDA-core FMAs
    prefetch: bool = False  # load chunk c+1 while unpacking chunk c (more registers, more bytes in flight)
    kernel: int = 1  # 1: w4a16_gemv_kernel; 2: w4a16_gemv2_kernel (per-row 2-D accumulators, unit-scale nibbles);
    # 3: w4a16_gemv3_kernel (fp16 nibble pairs; tl.dot, or packed fp16 FMAs at one row)
    unroll: int = 1  # kernel 2: chunks loaded per loop iteration (1 or 2)


@dataclass
class PackedW4:
    """The repacked tensors of one (or several fused) GPTQ linears; see the module docstring."""

    weight: torch.Tensor  # int32 [N, Kp/8]
    scale_zero: torch.Tensor  # fp16 [Gp, N, 2]
    perm: torch.Tensor | None  # int32 [Kp] (act-order) or None
    in_features: int
    out_features: int
    group_size: int  # effective: K (rounded up to 256) for group_size -1

    @property
    def padded_in(self) -> int:
        return self.weight.shape[1] * 8

    def nbytes(self) -> int:
        ts = [self.weight, self.scale_zero] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _chunks_per_group(group_size: int) -> int:
    """256-input chunks per group for groups of 256 or more (the kernels' group index is chunk // this)."""
    return max(1, group_size // CHUNK)


def _group_j(group_size: int) -> int:
    """Nibbles (32-input slices of a chunk) per group inside one 256-input chunk."""
    return min(8, group_size // 32)


# Bytes of temporaries per weight while repacking (int32 unpack, uint8, two int64 for the shifts and the sum):
# repacking runs next to the loaded checkpoint under a 4 GiB cap, so it goes REPACK_TEMP_BYTES at a time.
_REPACK_BYTES_PER_WEIGHT = 21
REPACK_TEMP_BYTES = 24 * 1024**2


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
           group_size: int, zero_offset: int = 1, n_chunk: int | None = None) -> PackedW4:
    """Standard GPTQ 4-bit tensors -> ``PackedW4`` on the same device, ``n_chunk`` outputs at a time (default:
    what keeps the temporaries near ``REPACK_TEMP_BYTES``)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise KernelError(f"qweight must be int32 [K/8, N] (4-bit GPTQ), got {qweight.dtype} {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if scales.shape[1] != n:
        raise KernelError(f"scales have {scales.shape[1]} columns for {n} outputs")
    kp = -(-k // CHUNK) * CHUNK
    gs = kp if group_size in (-1, 0) or group_size >= k else group_size
    if gs not in (32, 64, 128) and gs % CHUNK:
        # a group must tile the 256-input chunk (32/64/128) or be whole chunks
        raise KernelError(f"group_size {group_size} is not 32, 64, 128 or a multiple of 256")
    groups = scales.shape[0]
    if groups != -(-k // gs) and not (gs == kp and groups == 1):
        raise KernelError(f"{groups} scale groups do not match K={k} with group_size {group_size}")
    dev = qweight.device
    perm = None
    if g_idx is not None:
        g = g_idx.to(dev).long()
        expect = torch.arange(k, device=dev) // gs if gs != kp else torch.zeros(k, dtype=torch.long, device=dev)
        if not torch.equal(g, expect):
            order = torch.argsort(g, stable=True)
            if not torch.equal(g[order], expect):
                raise KernelError("g_idx does not form equal groups of group_size inputs (only GPTQ act-order "
                                  "permutations are supported)")
            perm = torch.zeros(kp, dtype=torch.int32, device=dev)
            perm[:k] = order.to(torch.int32)
    gp = -(-kp // gs)
    s = torch.zeros(gp, n, dtype=torch.float16, device=dev)
    z = torch.zeros(gp, n, dtype=torch.float16, device=dev)
    s[:groups] = scales.to(torch.float16)
    z[:groups] = unpack_cols(qzeros, n).to(torch.float16) + zero_offset
    words = torch.empty(n, kp // 8, dtype=torch.int32, device=dev)
    shifts = (4 * torch.arange(8, device=dev, dtype=torch.int64)).view(1, 8, 1, 1)
    if n_chunk is None:
        n_chunk = max(8, REPACK_TEMP_BYTES // (_REPACK_BYTES_PER_WEIGHT * kp) // 8 * 8)
    for n0 in range(0, n, n_chunk):
        q = unpack_rows(qweight[:, n0:n0 + n_chunk])  # [K, nc]
        if perm is not None:
            q = q[perm[:k].long()]
        q = torch.nn.functional.pad(q, (0, 0, 0, kp - k))
        # [C, 8 (j), 32 (i), nc] -> word (n, C, i) = sum_j q << 4j
        v = q.view(kp // CHUNK, 8, 32, -1).to(torch.int64)
        w = (v << shifts).sum(dim=1)  # [C, 32, nc]
        w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
        words[n0:n0 + n_chunk] = w.permute(2, 0, 1).reshape(-1, kp // 8)
    return PackedW4(weight=words, scale_zero=torch.stack([s, z], dim=-1).contiguous(), perm=perm,
                    in_features=k, out_features=n, group_size=gs)


def concat(parts: list[PackedW4]) -> PackedW4:
    """Several packed linears over the same input as one (their outputs side by side): fused q/k/v, gate/up."""
    p0 = parts[0]
    for p in parts[1:]:
        if (p.in_features, p.group_size, p.padded_in) != (p0.in_features, p0.group_size, p0.padded_in):
            raise KernelError("fused linears must share in_features and group_size")
        if (p.perm is None) != (p0.perm is None) or (p.perm is not None and not torch.equal(p.perm, p0.perm)):
            raise KernelError("fused linears must share their act-order permutation")
    return PackedW4(weight=torch.cat([p.weight for p in parts]), scale_zero=torch.cat([p.scale_zero for p in parts],
                    dim=1).contiguous(), perm=p0.perm, in_features=p0.in_features,
                    out_features=sum(p.out_features for p in parts), group_size=p0.group_size)


_JIT: dict[tuple[str, bool], object] = {}
GEMV_UNSPECIALIZED = ["M", "chunks_per_split", "stride_xm", "stride_om", "magic"]
# kernel 2 lets Triton specialize the row strides (K and N of a layer: fixed, multiples of 16 at 7B), so the
# activation loads of rows 1..7 are vectorized like row 0's; M (1 would be a constant) and the slice length stay
GEMV2_UNSPECIALIZED = ["M", "chunks_per_split", "magic"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _jitted(name: str):
    """The Triton kernel for ``name``, wrapped on first use (compiled or interpreted, as TRITON_INTERPRET says)."""
    key = (name, interpreting())
    if key not in _JIT:
        import triton

        from serving.kernels import _w4a16_triton as kernels

        # run-time values that change between calls of one layer (rows, split slices, strides) are not
        # specialized on (Triton would compile again whenever one of them crossed a multiple of 16 or 1)
        if name == "gemv":
            _JIT[key] = triton.jit(kernels.w4a16_gemv_kernel, do_not_specialize=GEMV_UNSPECIALIZED)
        elif name == "gemv2":
            _JIT[key] = triton.jit(kernels.w4a16_gemv2_kernel, do_not_specialize=GEMV2_UNSPECIALIZED)
        elif name == "gemv3":
            _JIT[key] = triton.jit(kernels.w4a16_gemv3_kernel, do_not_specialize=GEMV2_UNSPECIALIZED)
        elif name == "gemm":  # serving.kernels.w4a16_gemm: rows and strides change between prefill chunks
            from serving.kernels._w4a16_gemm_triton import w4a16_gemm_kernel

            _JIT[key] = triton.jit(w4a16_gemm_kernel, do_not_specialize=["M", "stride_xm", "stride_om"])
        else:
            _JIT[key] = triton.jit(kernels.w4a16_dequant_kernel, do_not_specialize=["n0"])
    return _JIT[key]


# -- launch

class SplitKWorkspace:
    """fp32 slices and per-tile counters for split-K calls, shared by every layer of a model: calls run one after
    another on a stream and each leaves its counters at zero."""

    def __init__(self, device: torch.device | str, max_out: int, max_rows: int = MAX_ROWS, max_split: int = MAX_SPLIT,
                 min_block_n: int = 16):
        self.partials = torch.empty(max_split * max_rows * max_out, dtype=torch.float32, device=device)
        self.counters = torch.zeros(-(-max_out // min_block_n), dtype=torch.int32, device=device)
        self.max_out, self.max_rows, self.max_split, self.min_block_n = max_out, max_rows, max_split, min_block_n

    def check(self, m: int, n: int, split: int, block_n: int) -> None:
        if m > self.max_rows or n > self.max_out or split > self.max_split or block_n < self.min_block_n:
            raise KernelError(f"split-K workspace too small for {m}x{n} split {split} block {block_n}")


def bucket(m: int) -> int:
    """The row bucket (1, 2, 4, 8) a call of m rows runs in."""
    return 1 << max(0, (m - 1).bit_length())


def default_config(n: int, k: int, m: int) -> GemvConfig:
    """Without a tuned entry: 64-output tiles (one row: 5.4 SASS instructions per weight and 128 registers on
    sm_90; several rows through tl.dot: 6.7 for up to 16 rows, where the 3-D FMA tiles take 9.5 at two rows),
    split along K until there are two programs per SM of an H100/H200 (132 SMs)."""
    block_n = 64
    tiles = -(-n // block_n)
    chunks = -(-k // CHUNK)
    split = 1
    while tiles * split < 264 and split * 2 <= min(MAX_SPLIT, chunks):
        split *= 2
    return GemvConfig(block_n=block_n, split_k=split, num_warps=4, num_stages=1, dot=m > 1)


def load_config_table(path: str | os.PathLike | None = None) -> dict[str, GemvConfig]:
    """A tuned table (``tests/gpu/bench_w4a16.py`` writes it): ``"NxK/mB"`` -> config. Missing file: empty.
    Default: $SERVING_W4A16_CONFIGS, else the table shipped beside this module."""
    p = Path(path or os.environ.get("SERVING_W4A16_CONFIGS") or CONFIG_TABLE)
    if not p.is_file():
        return {}
    data = json.loads(p.read_text())
    return {key: GemvConfig(**cfg) for key, cfg in data.get("configs", {}).items()}


def config_key(n: int, k: int, m_bucket: int) -> str:
    return f"{n}x{k}/m{m_bucket}"


def save_config_table(path: str | os.PathLike, table: dict[str, GemvConfig], meta: dict) -> None:
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "configs": {k: asdict(v) for k, v in sorted(table.items())}}, indent=1))
    os.replace(tmp, p)


def gemv(x: torch.Tensor, packed: PackedW4, config: GemvConfig, workspace: SplitKWorkspace | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W`` for M <= 8 -> [M, N] in x's dtype."""
    m, k = x.shape
    if k != packed.in_features:
        raise KernelError(f"input has {k} features, the layer {packed.in_features}")
    if m > MAX_ROWS:
        raise KernelError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n = packed.out_features
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    chunks = packed.padded_in // CHUNK
    per = -(-chunks // max(1, min(config.split_k, chunks)))
    split = -(-chunks // per)
    tiles = -(-n // config.block_n)
    if split > 1:
        if workspace is None:
            raise KernelError("a split-K config needs a SplitKWorkspace")
        workspace.check(m, n, split, config.block_n)
        part, cnt = workspace.partials, workspace.counters
    else:
        part, cnt = out, out  # unused
    perm = packed.perm if packed.perm is not None else packed.weight
    args = (x, packed.weight, packed.scale_zero, perm, out, part, cnt, m, n, k, packed.weight.shape[1],
            _chunks_per_group(packed.group_size), per, x.stride(0), out.stride(0), MAGIC)
    common = {"BLOCK_M": max(16, bucket(m)) if config.dot else bucket(m), "BLOCK_N": config.block_n,
              "GROUP_J": _group_j(packed.group_size), "HAS_PERM": packed.perm is not None, "SPLIT": split > 1,
              "DOT": config.dot, "num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.kernel == 2:
        if config.unroll not in (1, 2):
            raise KernelError(f"kernel 2 unrolls 1 or 2 chunks, not {config.unroll}")
        _jitted("gemv2")[(tiles, split)](*args, **common, SCALE_W=not config.dot and (config.scale_w or m > 1),
                                         UNROLL=config.unroll, FMA_ROWS=0 if config.dot else bucket(m))
        return out
    if config.kernel == 3:
        if not config.dot and m != 1:
            raise KernelError(f"kernel 3 without tl.dot multiplies one row, not {m}: its config needs dot=True")
        _jitted("gemv3")[(tiles, split)](*args, BLOCK_M=max(16, bucket(m)) if config.dot else 1,
                                         BLOCK_N=config.block_n, GROUP_J=common["GROUP_J"],
                                         HAS_PERM=common["HAS_PERM"], SPLIT=split > 1, DOT=config.dot,
                                         num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    if config.kernel != 1:
        raise KernelError(f"no GEMV kernel {config.kernel} (1, 2 or 3)")
    _jitted("gemv")[(tiles, split)](*args, **common, SCALE_W=config.scale_w, PREFETCH=config.prefetch)
    return out


def matmul_dequant(x: torch.Tensor, packed: PackedW4, block_n: int = 64) -> torch.Tensor:
    """``x [M, K] @ W`` for any M: dequantize ``DEQUANT_CHUNK_ELEMS`` of the weight at a time, then cuBLAS."""
    m, k = x.shape
    n, kp = packed.out_features, packed.padded_in
    xs = x[:, packed.perm[:k].long()] if packed.perm is not None else x
    rows = max(block_n, DEQUANT_CHUNK_ELEMS // kp // block_n * block_n)
    rows = min(rows, -(-n // block_n) * block_n)
    buf = torch.empty(rows, kp, dtype=x.dtype, device=x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kern = _jitted("dequant")
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        kern[(-(-r // block_n), kp // CHUNK)](packed.weight, packed.scale_zero, buf, n, kp // 8,
                                              _chunks_per_group(packed.group_size),
                                              n0, buf.stride(0), BLOCK_N=block_n,
                                              GROUP_J=_group_j(packed.group_size))
        torch.matmul(xs, buf[:r, :k].t(), out=out[:, n0:n0 + r])
    return out


def weight_bytes(packed: PackedW4) -> int:
    """Bytes one GEMV reads from the weight tensors (the bandwidth numerator)."""
    return packed.weight.numel() * 4 + packed.scale_zero.numel() * 2


__all__ = ["CHUNK", "MAX_ROWS", "GemvConfig", "KernelError", "PackedW4", "SplitKWorkspace", "bucket", "concat",
           "config_key", "default_config", "gemv", "interpreting", "load_config_table", "matmul_dequant", "repack",
           "save_config_table", "weight_bytes"]
