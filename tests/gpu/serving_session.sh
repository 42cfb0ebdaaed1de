#!/usr/bin/env bash
# The serving GPU session on one H200, as back-to-back calls on one warm machine (/tmp survives between them):
#   bash tests/gpu/serving_session.sh kernels   # W4A16 GEMV tuning + stack vs fp16/tinygemm; 7B checkpoint made meanwhile
#   bash tests/gpu/serving_session.sh gemv      # kernel 1 (shipped table) vs kernel 2 (tuned, BUDGET_S=120) vs their
#                                               # per-shape best vs fp16 cuBLAS vs tinygemm at rows 1,2,4,8 (~4 min);
#                                               # writes $OUT/w4a16.json, the table to /tmp; checkpoint made meanwhile
#   bash tests/gpu/serving_session.sh gemv_engine  # after gemv: serving.bench decode at batch 1 and 4 under 4 GiB,
#                                               # Marlin vs triton_gemv with that table; ENGINE_BACKENDS=triton_gemv
#                                               # (or marlin) runs one per call if both do not fit 10 minutes
#   bash tests/gpu/serving_session.sh speed     # engine v2 (Marlin and triton_gemv) vs fixed-slot engine vs HF generate
#   bash tests/gpu/serving_session.sh chat      # 10-turn chat with/without prefix caching, mixed-length load
#   bash tests/gpu/serving_session.sh measure   # one call: JSON-schema mask cost (carry .whl-grammar too), the
#                                               # paged engine at 4 GiB and at the fixed-slot engine's measured
#                                               # 4,650 MiB, 10-turn chat TTFT with/without prefix caching,
#                                               # triton_gemv vs Marlin decode (no cap)
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
  gemv)
    [ -f "$CKPT/config.json" ] || (python3 .whl-gpu/shared-tools/make_llama7b_gptq.py "$CKPT" > /tmp/mkckpt.log 2>&1 &)
    python3 tests/gpu/bench_w4a16.py --budget-s "${BUDGET_S:-120}" --backends v1,v2,ours,fp16,tinygemm \
      > "$OUT/w4a16_stdout.json"
    cp "$OUT/w4a16_configs.json" "$TABLE" ;;
  gemv_engine)
    [ -f "$CKPT/config.json" ] || (python3 .whl-gpu/shared-tools/make_llama7b_gptq.py "$CKPT" > /tmp/mkckpt.log 2>&1 &)
    [ -f "$TABLE" ] || cp serving/kernels/w4a16_configs.json "$TABLE"
    python3 tests/gpu/bench_w4a16.py --engine-only --table "$TABLE" --engine-ckpt "$CKPT" \
      --engine-backends "${ENGINE_BACKENDS:-marlin,triton_gemv}" --engine-timeout-s "${ENGINE_TIMEOUT_S:-270}" \
      > /dev/null ;;
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
  measure)
    [ -f .whl-grammar/install.sh ] && eval "$(bash .whl-grammar/install.sh)"
    [ -f "$CKPT/quantize_config.json" ] || python3 .whl-gpu/shared-tools/make_llama7b_gptq.py "$CKPT" >&2
    [ -f "$TABLE" ] && export SERVING_W4A16_CONFIGS=$TABLE
    P4=(--model "$CKPT" --device cuda --kv-cache-dtype int8 --embed-on-host --lm-head-int8 --cuda-stack-limit 256
        --prefill-chunk 128 --compile)
    mkdir -p /tmp/measure-logs  # at most 8 files come back: the logs travel as one tarball, renewed each step
    step() { local name=$1; shift; local t=$SECONDS
             "$@" > /dev/null 2> "/tmp/measure-logs/$name.log" || echo "$name failed" >&2
             echo "[$name] $((SECONDS - t)) s" >&2; tar -czf "$OUT/logs.tgz" -C /tmp/measure-logs .; }
    step structured env OUT="$OUT" bash tests/gpu/structured_gpu.sh "$CKPT"
    step paged_4g python3 -m serving.bench "${P4[@]}" --gpu-memory-gb 4 --batch-sizes 1,2 --prompt-len 128       --gen-len 128 --phases engine --out "$OUT/paged_4g.json"
    step paged_eq python3 -m serving.bench "${P4[@]}" --gpu-memory-gb 4.54 --batch-sizes 1,2,4 --prompt-len 128       --gen-len 128 --turns 10 --turn-gen 32 --phases engine,chat,chat_no_prefix --out "$OUT/paged_eq.json"
    step gemv python3 -m serving.bench --model "$CKPT" --device cuda --gpu-memory-gb 0 --kv-cache-dtype int8       --lm-head-int8 --compile --max-model-len 512 --prefill-chunk 128 --batch-sizes 1,4 --prompt-len 128       --gen-len 128 --gptq-backend triton_gemv --phases engine --out "$OUT/gemv_triton.json"
    step marlin python3 -m serving.bench --model "$CKPT" --device cuda --gpu-memory-gb 0 --kv-cache-dtype int8       --lm-head-int8 --compile --max-model-len 512 --prefill-chunk 128 --batch-sizes 1,4 --prompt-len 128       --gen-len 128 --gptq-backend marlin --phases engine --out "$OUT/gemv_marlin.json" ;;
  *) echo "usage: $0 kernels|gemv|gemv_engine|speed|chat|measure" >&2; exit 2 ;;
esac
