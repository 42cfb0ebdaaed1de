"""The forward pass over the loaded model with attention through block tables (``serving.kv_cache`` layout),
and the decode step captured as CUDA graphs per (batch bucket, context bucket).

Attention over blocks has two implementations behind one signature (helpers' PAGED_INTERFACE):
- the torch path (``serving.kernels.paged_attention_ref``: ``write_kv_ref``, ``paged_decode_attention_ref``,
  ``paged_prefill_attention_ref``): gather a row's blocks into a dense [kv_heads, context, head_dim] tensor, then
  SDPA. It is what CPU serving runs, and
  it is graph safe (fixed shapes per context bucket, no host sync);
- ``serving.kernels.paged_attention.paged_decode_attention`` (Triton), used for decode on CUDA when that module
  imports: it reads K/V in place instead of gathering them.

Without vendor BLAS (``vendor_blas=False``, the 4 GB profile's ``engine.vendor_blas: false``) nothing outside the
quantized linears calls a vendor library: the int8 lm_head runs ``serving.kernels.w8a16``, rotary cos/sin are a
broadcast multiply (HF's rotary module does ``inv_freq @ positions``, a cuBLAS batched GEMM, in some transformers
versions), prefill attention runs the Triton flash kernel over blocks and decode attention the Triton decode
kernel, on any device (interpreted on CPU under ``TRITON_INTERPRET=1``). Why: on the H200 (torch 2.11, 256-byte
stack) the first cuBLAS matmul adds 130 MiB to the process outside PyTorch's allocator and SDPA 28 MiB more; at
the 4 GB profile that is ~600 int8 KV tokens (266,240 B a token), the gap between the 144 tokens the fit found and
the 1,024 it must hold.

Imports only torch (the model's modules come from ``serving.model.load_model``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from importlib.util import find_spec

import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import EngineError
from serving.kernels.norm_act import add_rms_norm, add_rms_norm_ref, silu_mul, silu_mul_ref
from serving.kernels.paged_attention_ref import gather_kv, paged_prefill_attention_ref
from serving.kernels.paged_attention_ref import rotate_half as _rotate
from serving.kernels.paged_attention_ref import write_kv_ref as write_kv
from serving.kv_cache import KVBlocks
from serving.model import Int8Linear, fuse_linears

logger = logging.getLogger("serving.runner")

# the torch.compile backend of ``LlamaRunner.compile_decode``; SERVING_COMPILE_BACKEND=aot_eager checks the
# traced graphs without code generation (the CPU tests use it: no C++ build)
COMPILE_BACKEND = os.environ.get("SERVING_COMPILE_BACKEND", "inductor")


# ----------------------------------------------------------------------------------- attention over blocks

def _decode_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                   v_scale: torch.Tensor | None, block_tables: torch.Tensor, mask: torch.Tensor, scale: float,
                   num_blocks: int) -> torch.Tensor:
    """q [b, nh, hd] over the first ``num_blocks`` table entries; mask [b, 1, 1, num_blocks*bs] -> [b, nh*hd]
    (the compiled decode layer's piece: its mask is built once per step, outside, for every layer)."""
    b, nh, hd = q.shape
    kk, vv = gather_kv(k_cache, v_cache, k_scale, v_scale, block_tables, num_blocks, q.dtype)
    kvh = kk.shape[1]
    o = F.scaled_dot_product_attention(q.reshape(b, kvh, nh // kvh, hd), kk, vv, attn_mask=mask, scale=scale)
    return o.reshape(b, nh * hd)


def triton_decode_attention(force: bool = False) -> Callable | None:
    """``serving.kernels.paged_attention.paged_decode_attention`` when that module imports (the Triton kernel of
    helper "pagedattn"), else None (the torch path). ``force``: the Triton kernel on every device and dtype
    (``backend="triton"``: interpreted on CPU), for the no-vendor-BLAS mode."""
    try:
        from serving.kernels.paged_attention import paged_decode_attention
    except ImportError:
        return None
    return functools.partial(paged_decode_attention, backend="triton") if force else paged_decode_attention


# RoPE variants whose inv_freq the HF module recomputes from the sequence length at run time
DYNAMIC_ROPE = ("dynamic", "longrope")


def rope_cos_sin(inv_freq: torch.Tensor, scaling: float, pos: torch.Tensor, dtype: torch.dtype,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's Llama rotary cos/sin for ``pos`` [b, t] without a matmul: ``pos x inv_freq`` is an outer product
    (one multiply per element, the same float32 values as HF's ``inv_freq @ positions``)."""
    freqs = pos[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# ----------------------------------------------------------------------------------- the forward

class LlamaRunner:
    """A compact Llama-family forward that reuses the loaded model's modules, with attention over ``KVBlocks``."""

    def __init__(self, model: nn.Module, device: torch.device, embed_on_host: bool, lm_head_int8: bool,
                 fuse_projections: bool = False, paged_kernel: bool = True, vendor_blas: bool = True,
                 lm_head_int4: bool = False):
        inner = model.model
        cfg = model.config
        self.config = cfg
        self.device = device
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.n_heads
        self.groups = self.n_heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        self.vocab = cfg.vocab_size
        emb = inner.embed_tokens
        self.dtype = self.norm.weight.dtype
        self.embed_on_host = embed_on_host and device.type == "cuda"
        if self.embed_on_host and getattr(model.lm_head, "weight", None) is emb.weight:
            logger.warning("embed_on_host ignored: the embedding is tied to lm_head")
            self.embed_on_host = False
        if self.embed_on_host:
            self.embed_weight = emb.weight.detach().to("cpu").pin_memory()
            emb.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        else:
            self.embed_weight = emb.weight.detach()
        self.lm_head: nn.Module = model.lm_head
        if lm_head_int4 and isinstance(model.lm_head, nn.Linear):
            from serving.kernels.w4a16 import interpreting
            from serving.quant_linear import int4_lm_head

            if device.type != "cuda" and not interpreting():
                raise EngineError("engine.lm_head_int4 runs the Triton W4A16 GEMV: it needs CUDA")

            weight = model.lm_head.weight
            model.lm_head = nn.Identity()
            self.lm_head = int4_lm_head(weight, device)
            del weight
        elif lm_head_int8 and isinstance(model.lm_head, nn.Linear):
            weight = model.lm_head.weight
            model.lm_head = nn.Identity()
            self.lm_head = Int8Linear(weight.to("cpu"))
            del weight
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.lm_head = self.lm_head.to(device)
            # on CUDA the Triton W8A16 kernel reads the int8 rows once; the dequantize-then-cuBLAS path took 32
            # copies of 1,024 rows and 32 GEMMs a step, 0.56 of a 3.04 ms batch-1 decode graph (7B, H200 profile)
            self.lm_head.use_kernel = device.type == "cuda" and find_spec("triton") is not None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache: KVBlocks | None = None
        self.vendor_blas = vendor_blas
        if not vendor_blas:
            self._own_kernels(paged_kernel)
        # decode attention: the Triton kernel on CUDA when its module is there, else the torch gather + SDPA
        if not vendor_blas:
            self.decode_kernel = triton_decode_attention(force=True)
        else:
            self.decode_kernel = triton_decode_attention() if device.type == "cuda" and paged_kernel else None
        # q/k/v and gate/up as one GEMM each (``fuse_linears``), keyed by the attention / MLP module's id
        self.fused_qkv: dict[int, nn.Module] = {}
        self.fused_gate_up: dict[int, nn.Module] = {}
        self.qkv_sizes = (self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        # SiLU Llama-style layers decode through tensor-only pieces (``fused_decode_layer``) that
        # ``compile_decode`` can compile; other architectures go through their own modules (``decode_layer``)
        self.fusable = getattr(cfg, "hidden_act", "silu") == "silu" and all(
            not hasattr(layer.self_attn, "q_norm") and hasattr(layer.input_layernorm, "variance_epsilon")
            for layer in self.layers) and hasattr(self.norm, "variance_epsilon")
        self.decode_layer_fn = decode_layer
        self.fused = dict(FUSED_PIECES)
        # rotary + the K/V write as one Triton launch on CUDA (``serving.kernels.paged_attention.rope_write_kv``),
        # where the torch piece is the rotation's and the int8 quantization's element-wise work and four index_puts
        self.rope_kernel = self._rope_kernel(paged_kernel, vendor_blas)
        if self.rope_kernel:  # (the norms and the gate too, until ``compile_decode`` compiles them)
            self.fused.update(TRITON_PIECES)
        if self.fusable:
            self.eps = float(self.layers[0].input_layernorm.variance_epsilon)
            # plain tensors, not Parameters: dynamo guards on a Parameter's identity and would compile per layer
            self.norm_w = {id(layer): (layer.input_layernorm.weight.detach(),
                                       layer.post_attention_layernorm.weight.detach()) for layer in self.layers}
            self.norm_w_final, self.eps_final = self.norm.weight.detach(), float(self.norm.variance_epsilon)
            self.decode_layer_fn = fused_decode_layer
        if fuse_projections:
            self._fuse_projections()

    def _rope_kernel(self, paged_kernel: bool, vendor_blas: bool) -> bool:
        """Whether decode's rotary + K/V write runs the fused Triton kernel: on CUDA unless
        ``engine.attention_kernel`` is torch, and on every device without vendor BLAS (as the decode attention
        kernel: interpreted on CPU), for a head_dim the kernel takes."""
        wanted = not vendor_blas or (paged_kernel and self.device.type == "cuda")
        return (wanted and find_spec("triton") is not None and self.head_dim >= 16
                and not self.head_dim & (self.head_dim - 1))

    def _own_kernels(self, paged_kernel: bool) -> None:
        """Checks for ``vendor_blas=False``: every piece it replaces must be replaceable, or a clear error."""
        why = None
        if find_spec("triton") is None:
            why = "triton is not installed"
        elif not paged_kernel:
            why = "engine.attention_kernel=torch is SDPA"
        elif getattr(self.rotary, "rope_type", "default") in DYNAMIC_ROPE or not hasattr(self.rotary, "inv_freq"):
            why = f"rotary type {getattr(self.rotary, 'rope_type', type(self.rotary).__name__)!r}"
        elif not isinstance(self.lm_head, Int8Linear) and type(self.lm_head).__name__ != "GemvOnlyW4A16Linear":
            why = "the lm_head is not quantized (set engine.lm_head_int8 or engine.lm_head_int4)"
        elif self.head_dim < 16 or self.head_dim & (self.head_dim - 1):
            why = f"head_dim {self.head_dim} is not a power of two >= 16"
        if why is not None:
            raise EngineError(f"engine.vendor_blas=false cannot run this model: {why}")
        if isinstance(self.lm_head, Int8Linear):
            self.lm_head.use_kernel = True
        if self.device.type == "cuda" and any(type(m) is nn.Linear for layer in self.layers for m in layer.modules()):
            # an fp16/bf16 checkpoint: its projections are cuBLAS GEMMs, so the libraries load anyway
            logger.warning("engine.vendor_blas=false: this model's projections are plain linears (cuBLAS); only a "
                           "GPTQ checkpoint keeps cuBLAS out of the process")

    def rope(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [b, t, head_dim] for positions [b, t]: the model's rotary module, or (no vendor BLAS) the
        same values by broadcasting."""
        if self.vendor_blas:
            return self.rotary(h, pos)
        return rope_cos_sin(self.rotary.inv_freq, float(getattr(self.rotary, "attention_scaling", 1.0)), pos,
                            h.dtype)

    @property
    def attention_path(self) -> str:
        return "triton" if self.decode_kernel is not None else "torch"

    def _fuse_projections(self) -> None:
        """Replace each layer's q/k/v and gate/up projections by one fused module (freeing the separate ones)
        where ``fuse_linears`` can; SiLU-gated MLPs only. Each concatenation briefly holds the parts and the whole:
        where the device cannot (a tight ``engine.gpu_memory_gb`` with a fragmented allocator) the layers left keep
        their separate projections, with a warning, instead of failing the load."""
        try:
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                groups = [(attn, ("q_proj", "k_proj", "v_proj"), self.fused_qkv)]
                if self.fusable and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                    groups.append((mlp, ("gate_proj", "up_proj"), self.fused_gate_up))
                for owner, names, table in groups:
                    fused = fuse_linears([getattr(owner, n) for n in names])
                    if fused is not None:
                        table[id(owner)] = fused
                        for n in names:
                            setattr(owner, n, None)
        except torch.OutOfMemoryError as e:
            logger.warning("fusing projections stopped, the layers left stay separate: %s", str(e).split(".")[0])
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("fused projections: q/k/v in %d of %d layers, gate/up in %d", len(self.fused_qkv),
                    len(self.layers), len(self.fused_gate_up))

    def project_qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fused = self.fused_qkv.get(id(attn))
        if fused is None:
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        return fused(x).split(self.qkv_sizes, dim=-1)

    def project_gate_up(self, mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fused = self.fused_gate_up.get(id(mlp))
        if fused is None:
            return mlp.gate_proj(x), mlp.up_proj(x)
        return fused(x).chunk(2, dim=-1)

    # -- pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids on CPU (long) -> hidden states on the device."""
        if self.embed_on_host:
            return F.embedding(ids, self.embed_weight).to(self.device, non_blocking=True)
        return F.embedding(ids.to(self.device), self.embed_weight)

    def _qkv(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [b, t, H] -> rotated q [b, t, nh, hd], k [b, t, kvh, hd], v [b, t, kvh, hd]."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(attn, x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        return _rotate(q, c, s), _rotate(k, c, s), v

    def _mlp_block(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        x = layer.post_attention_layernorm(h)
        if id(layer.mlp) in self.fused_gate_up:
            return h + layer.mlp.down_proj(_gate(*self.project_gate_up(layer.mlp, x)))
        return h + layer.mlp(x)

    def prefill_attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ksc: torch.Tensor | None,
                          vsc: torch.Tensor | None, table: torch.Tensor, start: int, scale: float) -> torch.Tensor:
        if self.vendor_blas:
            return paged_prefill_attention_ref(q, kc, vc, ksc, vsc, table, start, scale)
        from serving.kernels.paged_attention import paged_prefill_attention

        return paged_prefill_attention(q, kc, vc, ksc, vsc, table, start, scale, backend="triton")

    def slot_mapping(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        bs = self.cache.block_size
        return torch.tensor([blocks[p // bs] * bs + p % bs for p in range(start, end)], dtype=torch.long)

    # -- prefill: one sequence, one chunk, attention over its blocks (earlier chunks, cached prefix) plus itself
    @torch.inference_mode()
    def prefill(self, ids: list[int], blocks: list[int], start: int, want_logits: bool) -> torch.Tensor | None:
        cache = self.cache
        t = len(ids)
        end = start + t
        h = self.embed(torch.tensor(ids, dtype=torch.long)).unsqueeze(0)
        pos = torch.arange(start, end, device=self.device)
        cos, sin = self.rope(h, pos.unsqueeze(0))
        slots = self.slot_mapping(blocks, start, end).to(self.device)
        table = torch.tensor(blocks[:-(-end // cache.block_size)], dtype=torch.int32).to(self.device)
        if self.fusable and self.rope_kernel:
            return self._prefill_kernels(h[0], cos[0], sin[0], slots, table, start, want_logits)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            write_kv(k[0], v[0], cache.k[i], cache.v[i], cache.ks[i], cache.vs[i], slots)
            o = self.prefill_attention(q[0], cache.k[i], cache.v[i], cache.ks[i], cache.vs[i], table, start,
                                       self.scale)
            h = h + attn.o_proj(o.reshape(1, t, self.n_heads * self.head_dim))
            h = self._mlp_block(layer, h)
        if not want_logits:
            return None
        return self.lm_head(self.norm(h[:, -1:]))[0, -1].float()

    def _prefill_kernels(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                         table: torch.Tensor, start: int, want_logits: bool) -> torch.Tensor | None:
        """``prefill`` of SiLU Llama-style layers where the Triton kernels run (``rope_kernel``): per layer the
        residual add + RMSNorm twice, the rotary + K/V write and the SiLU gate are one launch each
        (``serving.kernels.norm_act``, ``rope_write_kv``) instead of HF's modules' eager element-wise kernels;
        each layer's MLP output is added by the next layer's norm, as in decode. h [t, H]; cos/sin [t, hd]."""
        from serving.kernels.paged_attention import rope_write_kv

        cache, t = self.cache, h.shape[0]
        be = "triton"
        d = None
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            w_in, w_post = self.norm_w[id(layer)]
            h, x = add_rms_norm(h, d, w_in, self.eps, backend=be)
            q, k, v = self.project_qkv(attn, x)
            q = rope_write_kv(q, k, v, cos, sin, cache.k[i], cache.v[i], cache.ks[i], cache.vs[i], slots,
                              backend=be)
            o = self.prefill_attention(q, cache.k[i], cache.v[i], cache.ks[i], cache.vs[i], table, start,
                                       self.scale)
            h, x = add_rms_norm(h, attn.o_proj(o.reshape(t, self.n_heads * self.head_dim)), w_post, self.eps,
                                backend=be)
            g, u = self.project_gate_up(mlp, x)
            d = mlp.down_proj(silu_mul(g, u, backend=be))
        if not want_logits:
            return None
        _, x = add_rms_norm(h[-1:], d[-1:], self.norm_w_final, self.eps_final, backend=be)
        return self.lm_head(x)[0].float()

    # -- decode: one token per row, K/V read through the block tables
    def decode(self, h: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, max_context: int) -> torch.Tensor:
        """h [b,1,H]; pos [b] long; slots [b] long (where this token's K/V go); block_tables [b, >=max_context/bs]
        int32; context_lens [b] int32 (including this token); all on the device. Returns logits [b, V] float."""
        cache = self.cache
        b = h.shape[0]
        nb = -(-max_context // cache.block_size)
        cos, sin = self.rope(h, pos.unsqueeze(1))
        mask = None
        if self.decode_kernel is None:
            mask = (torch.arange(nb * cache.block_size, device=self.device)[None, :] < context_lens[:, None])
            mask = mask.view(b, 1, 1, -1)
        ctx = DecodeContext(slots, block_tables, context_lens, mask, nb, max_context)
        step = self.decode_layer_fn
        if step is fused_decode_layer:
            # each layer's MLP output is added to the residual stream by the next layer's input piece (and the
            # last one's by the final norm's): no element-wise add of its own per layer
            d = None
            for i, layer in enumerate(self.layers):
                h, d = step(self, layer, h, d, cos, sin, ctx, cache.k[i], cache.v[i], cache.ks[i], cache.vs[i])
            _, x = self.fused["mlp_in"](h, d, self.norm_w_final, self.eps_final)
            return self.lm_head(x)[:, 0].float()
        for i, layer in enumerate(self.layers):
            h = step(self, layer, h, cos, sin, ctx, cache.k[i], cache.v[i], cache.ks[i], cache.vs[i])
        return self.lm_head(self.norm(h))[:, 0].float()

    def decode_packed(self, packed: torch.Tensor, max_context: int, h: torch.Tensor | None = None) -> torch.Tensor:
        """``decode`` from the engine's packed rows (``serving.decode_inputs``): int32 [b, 4 + table width] on the
        device, [last token, position, slot, context length, block table...], one host-to-device copy a step. The
        embedding, the casts and the table's copy run here (inside the CUDA graph when captured, so a replay
        launches nothing for them); ``h`` [b, 1, H]: hidden states already embedded (``embed_on_host``)."""
        if h is None:
            h = F.embedding(packed[:, 0].long(), self.embed_weight).unsqueeze(1)
        return self.decode(h, packed[:, 1].long(), packed[:, 2].long(), packed[:, 4:].contiguous(),
                           packed[:, 3].contiguous(), max_context)

    def attend_decode(self, q: torch.Tensor, ctx: DecodeContext, kc: torch.Tensor, vc: torch.Tensor,
                      ksc: torch.Tensor | None, vsc: torch.Tensor | None) -> torch.Tensor:
        """Rotated q [b, nh, hd] -> [b, 1, nh*hd] through the Triton kernel or the torch path."""
        b = q.shape[0]
        if self.decode_kernel is not None:
            o = self.decode_kernel(q, kc, vc, ksc, vsc, ctx.block_tables, ctx.context_lens, self.scale,
                                   ctx.max_context)
            return o.reshape(b, 1, -1)
        return self.fused["attend"](q, kc, vc, ksc, vsc, ctx.block_tables, ctx.mask, self.scale,
                                    ctx.num_blocks).view(b, 1, -1)

    def compile_decode(self) -> bool:
        """Compile the pieces of ``fused_decode_layer``: the element-wise work between the projections (RMSNorm,
        rotary + int8 KV quantization and cache writes, the torch attention over blocks, SiLU-gate, the residual
        adds, the MLP's inside the next layer's RMSNorm) as
        programs shared by every layer (one per batch and context bucket), the projections (GPTQ kernels or plain
        linears) and the Triton attention kernel staying eager in between. Returns False (eager decode) for
        architectures without the pieces."""
        import torch._dynamo

        if not self.fusable:
            logger.warning("engine.compile: this architecture keeps the eager decode layer")
            return False
        dyn = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dyn, name):
                setattr(dyn, name, max(getattr(dyn, name), 256))
        backend = COMPILE_BACKEND
        self.fused = {name: torch.compile(fn, backend=backend, dynamic=False) for name, fn in FUSED_PIECES.items()}
        if self.rope_kernel:  # one Triton launch already: nothing for inductor to fuse
            self.fused["rope_write"] = _rope_write_triton
        return True


class DecodeContext:
    """What every layer of one decode step shares: where the new K/V go and what attention reads."""

    __slots__ = ("slots", "block_tables", "context_lens", "mask", "num_blocks", "max_context")

    def __init__(self, slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 mask: torch.Tensor | None, num_blocks: int, max_context: int):
        self.slots, self.block_tables, self.context_lens = slots, block_tables, context_lens
        self.mask, self.num_blocks, self.max_context = mask, num_blocks, max_context


def decode_layer(r: LlamaRunner, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ctx: DecodeContext, kc: torch.Tensor, vc: torch.Tensor, ksc: torch.Tensor | None,
                 vsc: torch.Tensor | None) -> torch.Tensor:
    """One decoder layer through the model's own modules (architectures without the fused pieces): writes the
    token's K/V at its slot, attends over its blocks, returns the new hidden states [b,1,H]."""
    attn = layer.self_attn
    q, k, v = r._qkv(attn, layer.input_layernorm(h), cos, sin)  # q [b,1,nh,hd], k/v [b,1,kvh,hd]
    write_kv(k[:, 0], v[:, 0], kc, vc, ksc, vsc, ctx.slots)
    h = h + attn.o_proj(r.attend_decode(q[:, 0], ctx, kc, vc, ksc, vsc))
    return r._mlp_block(layer, h)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rms_norm_ref(x, None, w, eps)[1]


def _rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ksc: torch.Tensor | None,
                vsc: torch.Tensor | None, kv_heads: int, head_dim: int) -> torch.Tensor:
    """q [b,1,nh*hd], k/v [b,1,kvh*hd] straight from the projections: rotate, store k/v (int8 when scales are
    given) at ``slots``; returns the rotated q [b, nh, hd]."""
    b = q.shape[0]
    c, s = cos.view(b, 1, head_dim), sin.view(b, 1, head_dim)
    q = _rotate(q.view(b, -1, head_dim), c, s)
    k = _rotate(k.view(b, kv_heads, head_dim), c, s)
    write_kv(k, v.view(b, kv_heads, head_dim), kc, vc, ksc, vsc, slots)
    return q


def _rope_write_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       slots: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ksc: torch.Tensor | None,
                       vsc: torch.Tensor | None, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``_rope_write`` in one Triton launch (CUDA)."""
    from serving.kernels.paged_attention import rope_write_kv

    b = q.shape[0]
    return rope_write_kv(q[:, 0], k[:, 0], v[:, 0], cos.view(b, head_dim), sin.view(b, head_dim), kc, vc, ksc, vsc,
                         slots, backend="triton")


def _mlp_in(h: torch.Tensor, o: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm_ref(h, o, w, eps)


def _gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return silu_mul_ref(g, u)


FUSED_PIECES = {"attn_in": _rms, "rope_write": _rope_write, "attend": _decode_attend, "mlp_in": _mlp_in,
                "gate": _gate}


def _rms_triton(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return add_rms_norm(x.reshape(-1, x.shape[-1]), None, w, eps, backend="triton")[1].view(x.shape)


def _mlp_in_triton(h: torch.Tensor, o: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h2, x = add_rms_norm(h.reshape(-1, h.shape[-1]), o.reshape(-1, o.shape[-1]), w, eps, backend="triton")
    return h2.view(h.shape), x.view(h.shape)


def _gate_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return silu_mul(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1]), backend="triton").view(g.shape)


# uncompiled decode where the Triton kernels run: one launch per piece (the torch pieces are several each)
TRITON_PIECES = {"attn_in": _rms_triton, "rope_write": _rope_write_triton, "mlp_in": _mlp_in_triton,
                 "gate": _gate_triton}


def fused_decode_layer(r: LlamaRunner, layer: nn.Module, h: torch.Tensor, d: torch.Tensor | None, cos: torch.Tensor,
                       sin: torch.Tensor, ctx: DecodeContext, kc: torch.Tensor, vc: torch.Tensor,
                       ksc: torch.Tensor | None, vsc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_layer`` for SiLU Llama-style layers: the element-wise work in tensor-only pieces (compiled by
    ``LlamaRunner.compile_decode``, plain functions otherwise) between the projections. ``d``: the previous
    layer's MLP output, not yet in ``h`` (None at the first layer); its add runs in this layer's input piece.
    Returns (the residual stream without this layer's MLP output, that output)."""
    f, attn, mlp = r.fused, layer.self_attn, layer.mlp
    w_in, w_post = r.norm_w[id(layer)]
    if d is None:
        x = f["attn_in"](h, w_in, r.eps)
    else:
        h, x = f["mlp_in"](h, d, w_in, r.eps)  # the residual add and the RMSNorm as one program
    q, k, v = r.project_qkv(attn, x)
    q = f["rope_write"](q, k, v, cos, sin, ctx.slots, kc, vc, ksc, vsc, r.kv_heads, r.head_dim)
    o = r.attend_decode(q, ctx, kc, vc, ksc, vsc)
    h, x = f["mlp_in"](h, attn.o_proj(o), w_post, r.eps)
    return h, mlp.down_proj(f["gate"](*r.project_gate_up(mlp, x)))


# ----------------------------------------------------------------------------------- CUDA graphs

class DecodeGraphs:
    """CUDA graphs of ``LlamaRunner.decode`` per (batch bucket, context bucket), sharing one memory pool. The
    inputs live in static buffers; padded rows write into the reserved block 0 and attend over one position."""

    def __init__(self, runner: LlamaRunner, batch_sizes: list[int], ctx_sizes: list[int], max_blocks: int,
                 max_batch_tokens: int | None = None):
        self.runner = runner
        # with the torch attention path only (b, ctx) buckets whose batch * context is at most ``max_batch_tokens``
        # are captured: that path gathers batch * context tokens of K/V per layer into the graph pool (7B int8 at
        # 8 x 2,048: about 400 MiB, a tenth of a 4 GB card), and rows that own their blocks cannot hold more than
        # the cache (x2 for bucket rounding); a step beyond them (rows sharing prefix blocks) runs eagerly. The
        # Triton decode kernel reads the blocks in place, so with it every bucket is captured: on the H200 the 4 GB
        # profile's 768-token cache had left batch 4 at contexts over 256 uncaptured, and its mixed-length load
        # decoded eagerly (~29 ms an engine step against a 3.2 ms graph replay).
        self.max_batch_tokens = max_batch_tokens
        self.batch_sizes = sorted(batch_sizes)
        self.ctx_sizes = sorted(ctx_sizes)
        bmax = self.batch_sizes[-1]
        dev = runner.device
        # the static inputs: the engine's packed rows (``LlamaRunner.decode_packed``; padded rows as
        # ``serving.decode_inputs.pad_rows`` leaves them: block 0, one position), and the hidden states when the
        # embedding runs on the host. One copy a step fills ``packed``; before, five copies and four fills did
        self.packed = torch.zeros(bmax, 4 + max_blocks, dtype=torch.int32, device=dev)
        self.packed[:, 3] = 1
        self.h = torch.zeros(bmax, 1, runner.hidden, dtype=runner.dtype, device=dev) if runner.embed_on_host else None
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @torch.inference_mode()
    def capture(self, on_first_decode: Callable[[], None] | None = None) -> None:
        """Every wanted bucket, largest first; ``on_first_decode`` is called after the first (eager) warm-up step
        (the engine reads the process's memory there)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.batch_sizes):
                for ctx in reversed(self.ctx_sizes):
                    if not self.wanted(b, ctx):
                        continue
                    args = (self.packed[:b], ctx, self.h[:b] if self.h is not None else None)
                    for _ in range(2):  # warm up kernels/workspaces outside capture
                        self.runner.decode_packed(*args)
                    if on_first_decode is not None:
                        on_first_decode()
                        on_first_decode = None
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool, stream=stream):
                        out = self.runner.decode_packed(*args)
                    if self.pool is None:
                        self.pool = g.pool()
                    self.graphs[(b, ctx)] = (g, out)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def time_replay(self, reps: int = 20) -> dict[str, float]:
        """Milliseconds per replay (the decode step alone: all layers and lm_head, no scheduling or sampling) at
        the shortest and longest context bucket. The static inputs point at block 0 only."""
        out = {}
        for (b, ctx), (graph, _) in sorted(self.graphs.items()):
            if ctx in (self.ctx_sizes[0], self.ctx_sizes[-1]):
                graph.replay()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(reps):
                    graph.replay()
                torch.cuda.synchronize()
                out[f"b{b}_ctx{ctx}"] = round((time.perf_counter() - t) / reps * 1000, 3)
        return out

    def wanted(self, b: int, ctx: int) -> bool:
        if b == 1 or self.max_batch_tokens is None or self.runner.decode_kernel is not None:
            return True
        return b * ctx <= self.max_batch_tokens

    def bucket(self, n: int, ctx: int) -> tuple[int, int] | None:
        """The captured (batch, context) bucket for ``n`` rows up to ``ctx`` positions, or None (run eagerly)."""
        b = next((x for x in self.batch_sizes if x >= n), None)
        c = next((x for x in self.ctx_sizes if x >= ctx), None)
        return (b, c) if b is not None and c is not None and (b, c) in self.graphs else None

    def run(self, host: torch.Tensor, n: int, ctx: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay for the first ``n`` of ``host``'s packed rows (``serving.decode_inputs.DecodeInputs.host``: the
        rows past ``n`` hold padding, so the bucket's rows go in one copy, asynchronous from pinned memory; the
        engine writes ``host`` again only once that copy is known to be done). ``tokens``: the rows' last tokens
        on the device (the step queued ahead, ``engine.overlap_decode``), in place of ``host``'s token column."""
        b, c = self.bucket(n, ctx)
        self.packed[:b].copy_(host[:b], non_blocking=True)
        if tokens is not None:
            self.packed[:n, 0].copy_(tokens)
        if self.h is not None:
            self.h[:n].copy_(self.runner.embed(host[:n, 0].long()).unsqueeze(1))
        g, out = self.graphs[(b, c)]
        g.replay()
        return out[:n]


def buckets(limit: int, first: int = 64) -> list[int]:
    out, x = [], first
    while x < limit:
        out.append(x)
        x *= 2
    out.append(limit)
    return out
