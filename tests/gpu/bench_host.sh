#!/usr/bin/env bash
# The engine's time per decode step outside the model's forward, the baseline and this checkout side by side
# (serving/bench_host.py), on the GPU: where the rollout's 4.2 ms decode steps go beyond the graph replay.
#   bash tests/gpu/bench_host.sh gpu   (carry .whl; BASELINE_SRC=DIR for the before/after: a folder in the tree
#        holding the baseline's serving/ and training/, made with
#        `mkdir -p hostcut-base && git archive 1b48906 serving training | tar -x -C hostcut-base`)
#        -> $OUT/host_step_real.json: TinyLlama's 1.1B shape, bf16, CUDA graphs, 8 and 16 rows x 128 tokens from
#           ~256-token prompts; per step the wall time, the replay's GPU time (CUDA events) and the rest;
#        -> $OUT/host_step_real_overlap.json: the same with engine.overlap_decode (this checkout only): step_us
#           against the run above is what the overlap hides;
#        -> $OUT/host_step_standin.json: the forward replaced by fixed logits (vocab 32,000), CUDA graphs off:
#           the engine's host work with CUDA's launch costs. About 4-5 minutes on one H200.
#   bash tests/gpu/bench_host.sh smoke (CPU) -> the same measurement on the tiny shape, a few tokens.
set -euo pipefail
OUT=${OUT:-/tmp/host-out}
mkdir -p "$OUT"
PY=${PY:-python3}
base=()
if [ -n "${BASELINE_SRC:-}" ]; then base=(--baseline-src "$BASELINE_SRC"); fi
case "${1:-}" in
    gpu)
        eval "$(bash .whl/install.sh)"
        export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
        $PY -m serving.bench_host "${base[@]}" --device cuda --shape 1b --forward real --prompt-len 256 \
            --rows 8,16 --reps 3 --rounds 1 --out "$OUT/host_step_real.json" | tail -60
        # engine.overlap_decode (what rollouts run): this checkout alone (the baseline has no such option)
        $PY -m serving.bench_host --device cuda --shape 1b --forward real --prompt-len 256 --overlap \
            --rows 8,16 --reps 3 --rounds 1 --out "$OUT/host_step_real_overlap.json" | tail -40
        $PY -m serving.bench_host "${base[@]}" --device cuda --shape tiny --vocab 32000 --forward standin \
            --rows 8,16 --reps 3 --rounds 2 --out "$OUT/host_step_standin.json" | tail -60 ;;
    smoke)
        $PY -m serving.bench_host "${base[@]}" --device cpu --shape tiny --forward real --rows 4 --new-tokens 16 \
            --reps 1 --rounds 1 --out "$OUT/host_step_real.json" | tail -30
        $PY -m serving.bench_host --device cpu --shape tiny --forward real --overlap --rows 4 --new-tokens 16 \
            --reps 1 --rounds 1 --out "$OUT/host_step_real_overlap.json" | tail -12 ;;
    *) echo "usage: $0 gpu|smoke" >&2; exit 2 ;;
esac
