#!/usr/bin/env bash
# Decode tok/s with and without a JSON-schema grammar mask on this project's engine (the issue's target on the
# GPU: at most 10% slower with the mask), batch 1 and 8; JSON to stdout and "$OUT/structured_decode.json".
#
# GPU machine (carry .whl-grammar/ from tests/gpu/wheels.sh, plus what `python -m serving.bench` needs for CKPT,
# e.g. the LLaMA-7B-shaped GPTQ checkpoint of ../shared/tools/make_llama7b_gptq.py and gptqmodel):
#   eval "$(bash .whl-grammar/install.sh)"; bash tests/gpu/structured_gpu.sh CKPT
# CPU smoke run of this script (a 2-layer random Llama with a 32,000-token vocabulary, built here):
#   bash tests/gpu/structured_gpu.sh --smoke
# The checkpoint's own tokenizer is a 300-token toy: the grammar uses .whl-grammar/tok32k (SmolLM2's BPE cut to
# 32,000 tokens, `python -m serving.bench_structured save-tokenizer`) so the mask is as costly as a real one.
set -euo pipefail
OUT=${OUT:-/tmp/structured-gpu-out}
PY=${PY:-python3}
TOK=${GRAMMAR_TOKENIZER:-.whl-grammar/tok32k}
mkdir -p "$OUT"
if [ "${1:-}" = "--smoke" ]; then
  MODEL=/tmp/structured-smoke-model
  [ -d "$TOK" ] || "$PY" -m serving.bench_structured save-tokenizer "$TOK" --vocab 32000
  "$PY" - "$MODEL" "$TOK" <<'EOF'
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

out, tok_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained(out)
tok.save_pretrained(out)
EOF
  ARGS=(--device cpu --batch-sizes 1,8 --prompt-len 16 --gen-len 32 --max-model-len 128)
else
  MODEL=${1:?usage: structured_gpu.sh CKPT | --smoke}
  # no memory cap: 8 slots of 512 tokens do not fit the 4 GiB profile (3 or 4 do), and the mask's cost is the point
  ARGS=(--gpu-memory-gb 0 --lm-head-int8 --compile --prompt-len 128 --gen-len 256 --max-model-len 512
        --prefill-chunk 128 --batch-sizes 1,8)
fi
"$PY" -m serving.bench_structured decode --model "$MODEL" --grammar-tokenizer "$TOK" "${ARGS[@]}" \
  --out "$OUT/structured_decode.json"
