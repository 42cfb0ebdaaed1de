#!/usr/bin/env bash
# The serving GPU session on one H200, as back-to-back calls on one warm machine (/tmp survives between them):
#   bash tests/gpu/serving_session.sh kernels   # W4A16 GEMV tuning + stack vs fp16/tinygemm; 7B checkpoint made meanwhile
#   bash tests/gpu/serving_session.sh speed     # engine v2 (Marlin and triton_gemv) vs fixed-slot engine vs HF generate
#   bash tests/gpu/serving_session.sh chat      # 10-turn chat with/without prefix caching, mixed-length load
# Carry .whl-gpu (tests/gpu/wheels.sh). Results under $OUT; the tuned W4A16 table is kept in /tmp for later calls.
set -euo pipefail
eval "$(bash .whl-gpu/install.sh)"
export PYTHONPATH=".:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GPTQMODEL_CPU_WORKERS=2
CKPT=/tmp/llama7b-gptq TABLE=/tmp/w4a16_configs.json
case "${1:-}" in
  kernels)
    [ -f "$CKPT/config.json" ] || (python3 .whl-gpu/shared-tools/make_llama7b_gptq.py "$CKPT" > /tmp/mkckpt.log 2>&1 &)
    python3 tests/gpu/bench_w4a16.py --budget-s "${BUDGET_S:-90}" --backends ours,fp16,tinygemm > "$OUT/w4a16_stdout.json"
    cp "$OUT/w4a16_configs.json" "$TABLE"
    while [ ! -f "$CKPT/quantize_config.json" ]; do sleep 5; done; du -sh "$CKPT" ;;
  speed)
    export SERVING_W4A16_CONFIGS=$TABLE
    CKPT=$CKPT bash tests/gpu/bench_engine_v2.sh speed
    python3 -m serving.bench --model "$CKPT" --device cuda --gpu-memory-gb 4 --kv-cache-dtype int8 --embed-on-host \
      --lm-head-int8 --cuda-stack-limit 256 --max-model-len 512 --prefill-chunk 128 --batch-sizes 1,2,4 \
      --prompt-len 128 --gen-len 128 --compile --gptq-backend triton_gemv --phases engine \
      --out "$OUT/bench_v2_speed_triton_gemv.json" > /dev/null ;;
  chat)
    export SERVING_W4A16_CONFIGS=$TABLE
    CKPT=$CKPT bash tests/gpu/bench_engine_v2.sh chat ;;
  *) echo "usage: $0 kernels|speed|chat" >&2; exit 2 ;;
esac
