#!/usr/bin/env bash
# Engine v2 (issue 16) on the GPU: the paged engine, today's fixed-slot engine (serving/bench_legacy = commit
# 9297f40's engine.py + model.py, bench-only copies) and HF generate, side by side, one JSON per part.
#   bash tests/gpu/bench_engine_v2.sh [speed|chat|all]     (default all; each part fits one 10-minute call)
# Carry: .whl-gpu (tests/gpu/wheels.sh: gptqmodel, pydantic, ../shared/data/instructionwild and ../shared/tools).
# CKPT=/path uses an existing LLaMA-7B-shaped GPTQ checkpoint; otherwise it is made under /tmp (3.9 GB).
# Writes $OUT/bench_v2_speed.json and $OUT/bench_v2_chat.json (summary_paged holds the targets).
# CPU smoke (tiny model): PY=.venv/bin/python DEVICE=cpu CKPT=/tmp/tiny SMOKE=1 bash tests/gpu/bench_engine_v2.sh
set -euo pipefail
MODE=${1:-all}
OUT=${OUT:-/tmp/bench-v2-out}; mkdir -p "$OUT"
for w in .whl-gpu; do [ -f "$w/install.sh" ] && eval "$(bash "$w/install.sh")"; done
export PYTHONPATH=".:${PYTHONPATH:-}"
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
STAGE=.whl-gpu
PROMPTS=${PROMPTS:-$STAGE/shared-data/instructionwild}
[ -d "$PROMPTS" ] || PROMPTS=../shared/data/instructionwild
if [ -z "${CKPT:-}" ]; then
  CKPT=/tmp/llama7b-gptq
  [ -f "$CKPT/config.json" ] || "$PY" "$STAGE/shared-tools/make_llama7b_gptq.py" "$CKPT" >&2
fi
# the 4 GB profile (serving/configs/gptq-4gb.yaml): int8 KV, host embedding, int8 lm_head, 256-byte CUDA stack
COMMON=(--model "$CKPT" --device "$DEVICE" --gpu-memory-gb 4 --kv-cache-dtype int8 --embed-on-host --lm-head-int8
        --cuda-stack-limit 256 --max-model-len 512 --prefill-chunk 128)
if [ -n "${SMOKE:-}" ]; then
  SPEED=(--batch-sizes 1,2 --prompt-len 8 --gen-len 16 --max-model-len 64)
  CHAT=(--turns 4 --turn-gen 8 --load-requests 8 --gen-len 24 --max-model-len 64)
else
  SPEED=(--batch-sizes 1,2,4 --prompt-len 128 --gen-len 128 --compile)
  CHAT=(--turns 10 --turn-gen 32 --load-requests 48 --gen-len 128)
fi
log() { echo "[bench_engine_v2] $*" >&2; }
if [ "$MODE" = speed ] || [ "$MODE" = all ]; then
  log "speed: paged engine, fixed-slot engine, HF generate (compiled decode for both engines)"
  "$PY" -m serving.bench "${COMMON[@]}" "${SPEED[@]}" --phases engine,legacy,generate \
    --out "$OUT/bench_v2_speed.json" > /dev/null
  python3 -c "import json; r = json.load(open('$OUT/bench_v2_speed.json')); print(json.dumps(r.get('summary_paged'), indent=1))"
fi
if [ "$MODE" = chat ] || [ "$MODE" = all ]; then
  log "chat and mixed load: prefix caching on/off, fixed-slot engine (eager decode for both engines)"
  "$PY" -m serving.bench "${COMMON[@]}" "${CHAT[@]}" --prompts "$PROMPTS" \
    --phases chat,chat_no_prefix,chat_legacy,load,load_legacy --out "$OUT/bench_v2_chat.json" > /dev/null
  python3 -c "import json; r = json.load(open('$OUT/bench_v2_chat.json')); print(json.dumps(r.get('summary_paged'), indent=1))"
fi
