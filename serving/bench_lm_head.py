"""What quantizing the lm_head costs in quality: the embedded SmolLM2-135M-Instruct on real chat text (Anthropic
HH harmless-base), the final hidden states computed once, then the logits through each lm_head variant the
engine offers: as loaded (fp32), ``engine.lm_head_int8`` (per-row int8, ``serving.model.Int8Linear``) and
``engine.lm_head_int4`` (4-bit RTN, ``serving.quant_linear.quantize_rtn_int4``, groups of 128, or 64 where the
hidden size is no multiple of 128 as SmolLM2's 576; groups of 32 for comparison). Prints JSON: perplexity, the
top-1 token's agreement with fp32 and the mean KL(fp32 || variant) per token. CPU, under a minute; no GPU needed
(the quantization is the same arithmetic on any device).

    python -m serving.bench_lm_head [--texts 48] [--max-tokens 256] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"


def _variants(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The lm_head weight [V, H] as each variant computes with it (dequantized to fp32)."""
    from serving.kernels.reference import dequantize
    from serving.quant_linear import quantize_rtn_int4

    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0  # Int8Linear's arithmetic
    out = {"fp32": w, "int8_per_row": torch.round(w / scale) * scale}
    k = w.shape[1]
    for gs in sorted({128 if k % 128 == 0 else 64, 32}, reverse=True):  # SmolLM2's hidden 576 = 9 x 64
        qweight, qzeros, scales, g = quantize_rtn_int4(w, gs)
        out[f"int4_rtn_g{g}"] = dequantize(qweight, qzeros, scales, None).t().contiguous()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default=None, help="an HF model folder (default: the embedded SmolLM2, converted)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = Path(args.model) if args.model else Path(tempfile.gettempdir()) / "smollm2-135m-fp32"
    if not args.model:
        from training.convert_gguf import convert, packaged_gguf

        convert(packaged_gguf(), path)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with gzip.open(args.data, "rt") as f:
        texts = [json.loads(line)["chosen"].strip() for _, line in zip(range(args.texts), f, strict=False)]
    variants = _variants(model.lm_head.weight.detach())
    stats = {k: {"nll": 0.0, "agree": 0, "kl": 0.0} for k in variants}
    n_tok = 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids[:, :args.max_tokens]
            h = model.model(input_ids=ids).last_hidden_state[0, :-1]  # predicts ids[1:]
            target = ids[0, 1:]
            base = F.log_softmax(h @ variants["fp32"].t(), dim=-1)
            for k, w in variants.items():
                lp = F.log_softmax(h @ w.t(), dim=-1)
                s = stats[k]
                s["nll"] += -lp.gather(1, target[:, None]).sum().item()
                s["agree"] += (lp.argmax(-1) == base.argmax(-1)).sum().item()
                s["kl"] += (base.exp() * (base - lp)).sum().item()
            n_tok += target.numel()
    res = {"model": str(path), "data": args.data, "texts": len(texts), "tokens": n_tok,
           "lm_head_mib_at_7b": {"fp16": 250.0, "int8_per_row": 125.1, "int4_rtn_g128": 66.5},
           "variants": {k: {"perplexity": round(float(torch.tensor(s["nll"] / n_tok).exp()), 4),
                            "top1_agreement_with_fp32": round(s["agree"] / n_tok, 4),
                            "mean_kl_from_fp32": float(f"{s['kl'] / n_tok:.4g}")} for k, s in stats.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
