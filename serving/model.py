"""The model side of one replica: loading (HF or GPTQ through GPTQModel), a compact Llama-family forward over
the loaded modules with attention over a fixed-slot KV cache (optionally int8), an int8 lm_head, and the decode
step captured as CUDA graphs. ``serving.engine`` schedules requests over it.

Imports only torch/transformers (+gptqmodel for GPTQ checkpoints)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("serving.model")

# Read when the CUDA allocator starts (first allocation), so set here, at import. Under a per-process cap the
# default allocator strands hundreds of MiB in partly used segments (measured at 4 GiB: 305 MiB reserved but
# unallocated, and the CUDA graphs no longer fitted); expandable segments grow and shrink one mapping instead.
# GPTQModel sets its own value only when none is set. A user's setting wins.
if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GIB = 1024**3


class EngineError(Exception):
    """Base of the engine's errors; ``status`` is the HTTP status the API maps it to."""

    status = 500
    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param


def _is_gptq(path: Path) -> bool:
    if (path / "quantize_config.json").is_file():
        return True
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    return q.get("quant_method") == "gptq"


def auto_gptq_backend(path: Path, device: torch.device) -> str:
    """torch on CPU; on CUDA Marlin where it applies (symmetric 4/8-bit), else ExLlamaV2 (4-bit, zero points too),
    else Triton."""
    if device.type != "cuda":
        return "torch"
    qfile = path / "quantize_config.json"
    q = json.loads(qfile.read_text()) if qfile.is_file() else \
        json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    bits, sym = q.get("bits", 4), q.get("sym", True)
    if sym and bits in (4, 8):
        return "marlin"
    return "exllama_v2" if bits == 4 else "triton"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EngineError("engine.device is cuda but CUDA is not available")
        dev = torch.device(device)
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def load_model(path: Path, device: torch.device, dtype: str = "auto", gptq_backend: str = "auto",
               ) -> tuple[nn.Module, bool]:
    """Load an HF causal LM (fp16/bf16/fp32) or a GPTQ checkpoint (GPTQModel kernels). Returns (model, is_gptq)."""
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"model type {cfg.get('model_type')!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    if _is_gptq(path):
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
        from gptqmodel import BACKEND, GPTQModel

        if gptq_backend == "auto":
            gptq_backend = auto_gptq_backend(path, device)
        # triton_gemv: GPTQModel's TORCH layers keep the standard tensors, repacked for serving.kernels below
        backend = {"marlin": BACKEND.MARLIN, "exllama_v2": BACKEND.EXLLAMA_V2, "triton": BACKEND.TRITON,
                   "torch": BACKEND.TORCH, "triton_gemv": BACKEND.TORCH}[gptq_backend]
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["dtype"] = torch.float16
        wrapped = GPTQModel.load(str(path), backend=backend, device=str(device), **kwargs)
        model = wrapped.model
        if gptq_backend == "triton_gemv":
            from serving.quant_linear import swap_gptq_linears

            swap_gptq_linears(model)
        return model.eval(), True
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, low_cpu_mem_usage=True)
    return model.to(device).eval(), False


class Int8Linear(nn.Module):
    """Weight-only int8 linear with per-row scales, dequantized 1024 rows at a time: at hidden 4096 the fp16
    temporary is 8 MiB, held by both the activation reserve and the CUDA graph pool of a 4 GiB replica."""

    def __init__(self, weight: torch.Tensor, chunk: int = 1024):
        super().__init__()
        w = weight.detach().to("cpu", torch.float32)  # quantize in host memory: no fp32 copy on the GPU
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8).to(weight.device))
        self.register_buffer("scale", scale.squeeze(1).to(weight.dtype).to(weight.device))
        self.chunk = chunk
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.chunk
        parts = [F.linear(x, self.weight[s:s + step].to(x.dtype)) for s in range(0, self.out_features, step)]
        return torch.cat(parts, dim=-1) * self.scale


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)`` with one GEMM: plain ``nn.Linear`` (weights
    concatenated) or GPTQModel's Marlin layers (Marlin's layout tiles the output dimension in 64-column blocks,
    so the repacked weights and permuted scales concatenate along it). None when the modules do not qualify.
    The result is checked against the separate modules on a random input; a mismatch also gives None."""
    m0 = mods[0]
    if all(type(m) is nn.Linear for m in mods):
        if len({(m.in_features, m.weight.dtype, m.bias is None) for m in mods}) != 1:
            return None
        fused = nn.Linear(m0.in_features, sum(m.out_features for m in mods), bias=m0.bias is not None,
                          device=m0.weight.device, dtype=m0.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in mods]))
            if m0.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in mods]))
    elif type(m0).__name__ in ("MarlinLinear", "MarlinQuantLinear"):
        keys = ("in_features", "bits", "group_size", "desc_act", "sym")
        if any(type(m) is not type(m0) or getattr(m, "bias", None) is not None or m.out_features % 64
               or getattr(m, "_marlin_tile_padding", None) is not None or getattr(m, "desc_act", False)
               or getattr(m, "adapter", None) is not None
               or any(getattr(m, k, None) != getattr(m0, k, None) for k in keys) for m in mods):
            return None
        import copy

        fused = copy.copy(m0)
        fused._parameters, fused._buffers, fused._modules = dict(m0._parameters), dict(m0._buffers), {}
        for name in ("qweight", "scales"):
            t = torch.cat([getattr(m, name).data for m in mods], dim=1)
            if name in fused._parameters:
                fused._parameters[name] = nn.Parameter(t, requires_grad=False)
            elif name in fused._buffers:
                fused._buffers[name] = t
            else:
                fused.__dict__[name] = t
        fused.out_features = sum(m.out_features for m in mods)
    else:
        return None
    with torch.inference_mode():
        dev = next(iter([*m0.parameters(), *m0.buffers()])).device
        dtype = m0.weight.dtype if isinstance(m0, nn.Linear) else torch.float16
        x = torch.randn(3, m0.in_features, device=dev, dtype=dtype,
                        generator=torch.Generator(device=dev).manual_seed(0))
        ref = torch.cat([m(x) for m in mods], dim=-1).float()
        err = (fused(x).float() - ref).abs().max().item()
    if not err <= 0.02 * ref.abs().max().item() + 1e-3:
        logger.warning("fusing %s projections changed their output (max error %.3g): kept separate",
                       type(m0).__name__, err)
        return None
    return fused


class KVCache:
    """K/V for ``slots`` sequences of up to ``max_len`` tokens, one tensor per layer: [slots, kv_heads, max_len,
    head_dim] (int8 with a per token and head scale when ``quantized``). Separate per-layer tensors let one
    compiled decode layer serve every layer (same shapes, no storage offsets)."""

    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, quantized: bool):
        shape = (slots, kv_heads, max_len, head_dim)
        self.quantized, self.dtype, self.slots, self.max_len = quantized, dtype, slots, max_len
        store = torch.int8 if quantized else dtype
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(layers)]
        self.ks: list[torch.Tensor | None] = [None] * layers
        self.vs: list[torch.Tensor | None] = [None] * layers
        if quantized:
            self.ks = [torch.ones(shape[:-1] + (1,), dtype=dtype, device=device) for _ in range(layers)]
            self.vs = [torch.ones(shape[:-1] + (1,), dtype=dtype, device=device) for _ in range(layers)]

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, quantized: bool) -> int:
        elem = 1 if quantized else torch.tensor([], dtype=dtype).element_size()
        scale = 2 * torch.tensor([], dtype=dtype).element_size() if quantized else 0
        return layers * kv_heads * (2 * head_dim * elem + scale)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.k, *self.v, *self.ks, *self.vs) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def write_range(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """A chunk of one sequence: k/v [kv_heads, T, head_dim] at positions start..start+T-1."""
        end = start + k.shape[1]
        if self.quantized:
            (kq, ksc), (vq, vsc) = quantize_int8(k, self.dtype), quantize_int8(v, self.dtype)
            self.k[layer][slot, :, start:end] = kq
            self.v[layer][slot, :, start:end] = vq
            self.ks[layer][slot, :, start:end] = ksc
            self.vs[layer][slot, :, start:end] = vsc
        else:
            self.k[layer][slot, :, start:end] = k
            self.v[layer][slot, :, start:end] = v

    def read(self, layer: int, slots: slice, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_kv(self.k[layer], self.v[layer], self.ks[layer], self.vs[layer], slots, ctx, self.dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        for t in self._tensors():
            t[dst, :, :length].copy_(t[src, :, :length])


def quantize_int8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: (values, scale in ``dtype``)."""
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-6) / 127.0
    return torch.round(x.float() / s).clamp(-127, 127).to(torch.int8), s.to(dtype)


def read_kv(k: torch.Tensor, v: torch.Tensor, ks: torch.Tensor | None, vs: torch.Tensor | None, slots: slice,
            ctx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = k[slots, :, :ctx], v[slots, :, :ctx]
    if ks is not None:
        k = k.to(dtype) * ks[slots, :, :ctx]
        v = v.to(dtype) * vs[slots, :, :ctx]
    return k, v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class LlamaRunner:
    """A compact Llama-family forward that reuses the loaded model's modules, with attention over ``KVCache``."""

    def __init__(self, model: nn.Module, device: torch.device, embed_on_host: bool, lm_head_int8: bool,
                 fuse_projections: bool = False):
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
        if lm_head_int8 and isinstance(model.lm_head, nn.Linear):
            weight = model.lm_head.weight
            model.lm_head = nn.Identity()
            self.lm_head = Int8Linear(weight.to("cpu"))
            del weight
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.lm_head = self.lm_head.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache: KVCache | None = None
        # q/k/v and gate/up as one GEMM each (``fuse_linears``), keyed by the attention / MLP module's id
        self.fused_qkv: dict[int, nn.Module] = {}
        self.fused_gate_up: dict[int, nn.Module] = {}
        self.qkv_sizes = (self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        # SiLU Llama-style layers decode through tensor-only pieces (``fused_decode_layer``) that
        # ``compile_decode`` can compile; other architectures go through their own modules (``decode_layer``)
        self.fusable = getattr(cfg, "hidden_act", "silu") == "silu" and all(
            not hasattr(layer.self_attn, "q_norm") and hasattr(layer.input_layernorm, "variance_epsilon")
            for layer in self.layers)
        self.decode_layer_fn = decode_layer
        if self.fusable:
            self.eps = float(self.layers[0].input_layernorm.variance_epsilon)
            # plain tensors, not Parameters: dynamo guards on a Parameter's identity and would compile per layer
            self.norm_w = {id(layer): (layer.input_layernorm.weight.detach(),
                                       layer.post_attention_layernorm.weight.detach()) for layer in self.layers}
            self.fused = dict(FUSED_PIECES)
            self.decode_layer_fn = fused_decode_layer
        if fuse_projections:
            self._fuse_projections()

    def _fuse_projections(self) -> None:
        """Replace each layer's q/k/v and gate/up projections by one fused module (freeing the separate ones)
        where ``fuse_linears`` can; SiLU-gated MLPs only."""
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
        b, t, _ = x.shape
        q, k, v = self.project_qkv(attn, x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return _rotate(q, c, s), _rotate(k, c, s), v

    def _mlp_block(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        x = layer.post_attention_layernorm(h)
        if id(layer.mlp) in self.fused_gate_up:
            return h + layer.mlp.down_proj(_gate(*self.project_gate_up(layer.mlp, x)))
        return h + layer.mlp(x)

    # -- prefill: one sequence, one chunk, attention over the cache (earlier chunks) plus itself
    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int, start: int, want_logits: bool) -> torch.Tensor | None:
        cache = self.cache
        t = len(ids)
        h = self.embed(torch.tensor(ids, dtype=torch.long)).unsqueeze(0)
        pos = torch.arange(start, start + t, device=self.device)
        cos, sin = self.rotary(h, pos.unsqueeze(0))
        end = start + t
        mask = torch.arange(end, device=self.device)[None, :] <= pos[:, None]  # [t, end]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)
            cache.write_range(i, slot, start, k[0], v[0])
            kk, vv = cache.read(i, slice(slot, slot + 1), end)
            if self.groups > 1:
                kk, vv = kk.repeat_interleave(self.groups, dim=1), vv.repeat_interleave(self.groups, dim=1)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, t, self.n_heads * self.head_dim))
            h = self._mlp_block(layer, h)
        if not want_logits:
            return None
        return self.lm_head(self.norm(h[:, -1:]))[0, -1].float()

    # -- decode: rows 0..b-1 of the cache, one token each
    def decode(self, h: torch.Tensor, pos: torch.Tensor, ctx: int) -> torch.Tensor:
        """h [b,1,H] on device, pos [b] long on device; returns logits [b, V] float."""
        cache = self.cache
        b = h.shape[0]
        rows = torch.arange(b, device=self.device)
        cos, sin = self.rotary(h, pos.unsqueeze(1))
        mask = (torch.arange(ctx, device=self.device)[None, :] <= pos[:, None]).view(b, 1, 1, ctx)
        step = self.decode_layer_fn
        for i, layer in enumerate(self.layers):
            h = step(self, layer, h, cos, sin, mask, rows, pos, cache.k[i], cache.v[i], cache.ks[i], cache.vs[i], ctx)
        return self.lm_head(self.norm(h))[:, 0].float()

    def compile_decode(self) -> bool:
        """Compile the pieces of ``fused_decode_layer``: the element-wise work between the projections (RMSNorm,
        rotary, int8 KV quantization and cache writes, dequantized reads, SiLU-gate, residual) as four programs
        shared by every layer (one per batch and context bucket), the projections (GPTQ kernels or plain
        linears) staying eager in between. Returns False (eager decode) for architectures without the pieces."""
        import torch._dynamo

        if not self.fusable:
            logger.warning("engine.compile: this architecture keeps the eager decode layer")
            return False
        dyn = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dyn, name):
                setattr(dyn, name, max(getattr(dyn, name), 256))
        self.fused = {name: torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False)
                      for name, fn in FUSED_PIECES.items()}
        return True


# the torch.compile backend of ``LlamaRunner.compile_decode``; SERVING_COMPILE_BACKEND=aot_eager checks the
# traced graphs without code generation (the CPU tests use it: no C++ build)
COMPILE_BACKEND = os.environ.get("SERVING_COMPILE_BACKEND", "inductor")


def decode_layer(r: LlamaRunner, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 ksc: torch.Tensor | None, vsc: torch.Tensor | None, ctx: int) -> torch.Tensor:
    """One decoder layer for one new token per row: writes the token's K/V into this layer's cache tensors at
    (rows, pos), attends over ``ctx`` cached positions, returns the new hidden states [b,1,H]."""
    attn = layer.self_attn
    q, k, v = r._qkv(attn, layer.input_layernorm(h), cos, sin)  # q [b,nh,1,hd], k/v [b,kvh,1,hd]
    o = _cache_attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask, rows, pos, kc, vc, ksc, vsc, ctx)
    h = h + attn.o_proj(o)
    return r._mlp_block(layer, h)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _cache_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                  pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ksc: torch.Tensor | None,
                  vsc: torch.Tensor | None, ctx: int) -> torch.Tensor:
    """One new token per row, rotated q [b,nh,hd] and k/v [b,kvh,hd]: store k/v at (rows, pos) in this layer's
    cache tensors (int8 with scales when ``ksc`` is given), attend over ``ctx`` cached positions; -> [b,1,nh*hd]."""
    b, kv_heads, head_dim = k.shape
    if ksc is not None:
        (k, ks), (v, vs) = quantize_int8(k, q.dtype), quantize_int8(v, q.dtype)
        ksc[rows, :, pos] = ks
        vsc[rows, :, pos] = vs
    kc[rows, :, pos] = k
    vc[rows, :, pos] = v
    kk, vv = read_kv(kc, vc, ksc, vsc, slice(0, b), ctx, q.dtype)  # [b,kvh,ctx,hd]
    qg = q.reshape(b, kv_heads, -1, head_dim)  # query heads grouped per kv head
    o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask)
    return o.reshape(b, 1, -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
            ksc: torch.Tensor | None, vsc: torch.Tensor | None, ctx: int, kv_heads: int,
            head_dim: int) -> torch.Tensor:
    """q [b,1,nh*hd], k/v [b,1,kvh*hd] straight from the projections -> attention output [b,1,nh*hd]."""
    b = q.shape[0]
    c, s = cos.view(b, 1, head_dim), sin.view(b, 1, head_dim)
    q = _rotate(q.view(b, -1, head_dim), c, s)  # [b,nh,hd]
    k = _rotate(k.view(b, kv_heads, head_dim), c, s)
    return _cache_attend(q, k, v.view(b, kv_heads, head_dim), mask, rows, pos, kc, vc, ksc, vsc, ctx)


def _mlp_in(h: torch.Tensor, o: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + o
    return h, _rms(h, w, eps)


def _gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


FUSED_PIECES = {"attn_in": _rms, "attend": _attend, "mlp_in": _mlp_in, "gate": _gate}


def fused_decode_layer(r: LlamaRunner, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                       ksc: torch.Tensor | None, vsc: torch.Tensor | None, ctx: int) -> torch.Tensor:
    """``decode_layer`` for SiLU Llama-style layers: the element-wise work in tensor-only pieces (compiled by
    ``LlamaRunner.compile_decode``, plain functions otherwise) between the projections."""
    f, attn, mlp = r.fused, layer.self_attn, layer.mlp
    w_in, w_post = r.norm_w[id(layer)]
    x = f["attn_in"](h, w_in, r.eps)
    q, k, v = r.project_qkv(attn, x)
    o = f["attend"](q, k, v, cos, sin, mask, rows, pos, kc, vc, ksc, vsc, ctx, r.kv_heads, r.head_dim)
    h, x = f["mlp_in"](h, attn.o_proj(o), w_post, r.eps)
    return h + mlp.down_proj(f["gate"](*r.project_gate_up(mlp, x)))


class DecodeGraphs:
    """CUDA graphs of ``LlamaRunner.decode`` per (batch bucket, context bucket), sharing one memory pool."""

    def __init__(self, runner: LlamaRunner, batch_sizes: list[int], ctx_sizes: list[int]):
        self.runner = runner
        self.batch_sizes = sorted(batch_sizes)
        self.ctx_sizes = sorted(ctx_sizes)
        bmax = self.batch_sizes[-1]
        dev = runner.device
        self.h = torch.zeros(bmax, 1, runner.hidden, dtype=runner.dtype, device=dev)
        self.pos = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.batch_sizes):
                for ctx in reversed(self.ctx_sizes):
                    h, pos = self.h[:b], self.pos[:b]
                    for _ in range(2):  # warm up kernels/workspaces outside capture
                        self.runner.decode(h, pos, ctx)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool, stream=stream):
                        out = self.runner.decode(h, pos, ctx)
                    if self.pool is None:
                        self.pool = g.pool()
                    self.graphs[(b, ctx)] = (g, out)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def time_replay(self, reps: int = 20) -> dict[str, float]:
        """Milliseconds per replay (the decode step alone: all layers and lm_head, no scheduling or sampling) at
        the shortest and longest context bucket. Run before any request: it writes garbage into cache rows."""
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

    def run(self, h: torch.Tensor, pos: torch.Tensor, ctx: int) -> torch.Tensor:
        n = h.shape[0]
        b = next(x for x in self.batch_sizes if x >= n)
        c = next(x for x in self.ctx_sizes if x >= ctx)
        self.h[:n].copy_(h)
        self.pos[:n].copy_(pos)
        if b > n:
            self.pos[n:b].zero_()
        g, out = self.graphs[(b, c)]
        g.replay()
        return out[:n]


def _buckets(limit: int, first: int = 64) -> list[int]:
    out, x = [], first
    while x < limit:
        out.append(x)
        x *= 2
    out.append(limit)
    return out
