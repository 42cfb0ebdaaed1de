#!/usr/bin/env bash
# The first decode's ~70 MiB outside the allocator (H200, 4 GB profile), in one short call carrying .whl-gpu:
#   1. single CUDA actions, each in a fresh process at the 64-byte stack (tests/gpu/outside_alloc_probe.py):
#      $OUT/outside_alloc.json
#   2. a 2-layer LLaMA-7B-shaped GPTQ engine (gptq_backend triton_gemv: no Marlin build) at the profile's options
#      under memory_probe's op trace: $OUT/probe_l2_trace.json (the load steps, and which call grew the process),
#      then the same without engine.compile: $OUT/probe_l2_nocompile.json (first_decode's delta beside it)
# Logs: $OUT/outside_alloc.log. Each part writes its JSON as it goes, so a call cut short keeps what it measured.
set -uo pipefail
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GPTQMODEL_CPU_WORKERS=2
LOG="$OUT/outside_alloc.log"
eval "$(bash .whl-gpu/install.sh 2>> "$LOG")"  # pydantic etc.: the engine-kernel candidates import serving
python3 tests/gpu/outside_alloc_probe.py --out "$OUT/outside_alloc.json" > /dev/null 2>> "$LOG"
L2=/tmp/llama7b-l2-gptq
if [ ! -f "$L2/quantize_config.json" ]; then
    sed 's/^H, I, L, V, G = 4096, 11008, 32, 32000, 128$/H, I, L, V, G = 4096, 11008, 2, 32000, 128/' \
        .whl-gpu/shared-tools/make_llama7b_gptq.py > /tmp/mk_l2.py
    python3 /tmp/mk_l2.py "$L2" >> "$LOG" 2>&1
fi
python3 tests/gpu/memory_probe.py --model "$L2" --gpu-memory-gb 1 --no-vendor-blas --cuda-stack-limit 64 \
    --max-model-len 0 --gptq-backend triton_gemv --op-trace --out "$OUT/probe_l2_trace.json" > /dev/null 2>> "$LOG"
echo "rc=$?" >> "$LOG"
python3 tests/gpu/memory_probe.py --model "$L2" --gpu-memory-gb 1 --no-vendor-blas --cuda-stack-limit 64 \
    --max-model-len 0 --gptq-backend triton_gemv --no-compile --out "$OUT/probe_l2_nocompile.json" > /dev/null 2>> "$LOG"
echo "rc=$?" >> "$LOG"
