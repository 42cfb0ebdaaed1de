#!/usr/bin/env bash
# PPO rollouts: the HF loop (ppo.rollout_engine=hf) against the serving engine (ppo.rollout_engine=serving), side by
# side as JSON: seconds per step of rollout, weight sync and updates, tokens/s, step time (training/rollout.py).
#   bash tests/gpu/bench_rollout.sh bench    (carry .whl) -> $OUT/throughput.json: `training.bench throughput
#            --stages ppo` on the 1.1B TinyLlama shape, plugins $PLUGINS (default ddp,zero2), engines
#            $ROLLOUT_ENGINES (default hf,serving+ptxjoint,serving,serving+overlap,serving+compile+overlap:
#            +compile is ppo.rollout_compile, +overlap ppo.rollout_overlap, +ptxjoint ppo.ptx_pass=joint, the
#            update's rollouts and PTX rows in one padded batch as before), ppo_speedup
#            per plugin. About 80 s per PPO run of 8 steps on one H200: PLUGINS=ddp keeps it to ~4-5 minutes.
#   bash tests/gpu/bench_rollout.sh quality  (carry .whl; after `tests/gpu/quality_gpu.sh stage` and `run` on the
#            same warm machine, which leave models/ and runs/quality-gpu/: the RM stage is enough, the PPO config
#            then comes from loadtest/results/h200/alignment/ppo-manifest.json) -> $OUT/rollout_quality.json: the
#            quality-gpu PPO stage (SmolLM2-135M, HH) again from its manifest's config, $PPO_STEPS steps (default
#            20) per engine: step time, rollout/update/sync seconds, KL, held-out greedy reward before/after.
#            ENGINES=hf / ENGINES=serving run one engine per call (the JSON accumulates in /tmp on the warm
#            machine): PPO_STEPS=60 for the issue's 60-step held-out reward.
#   bash tests/gpu/bench_rollout.sh smoke    (CPU, no wheels) -> the bench on the tiny shape, 3 steps;
#        then `smoke-quality`: rollout_quality.py over the smoke's PPO manifest, 3 steps per engine.
set -euo pipefail
OUT=${OUT:-/tmp/rollout-out}
mkdir -p "$OUT"
PY=${PY:-python3}
case "${1:-}" in
    bench)
        eval "$(bash .whl/install.sh)"
        export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
        $PY -m training.bench throughput --out /tmp/rollout-bench --stages ppo --plugins "${PLUGINS:-ddp,zero2}" \
            --rollout-engines "${ROLLOUT_ENGINES:-hf,serving+ptxjoint,serving,serving+overlap,serving+compile+overlap}" \
            --steps "${STEPS:-8}" --skip 3 \
            --timeout 300 | tail -80
        cp /tmp/rollout-bench/throughput.json "$OUT/throughput.json"
        for f in /tmp/rollout-bench/*.log; do tail -40 "$f" > "$OUT/$(basename "$f" | tr '+' '_')"; done ;;
    quality)
        eval "$(bash .whl/install.sh)"
        export PYTHONPATH=/tmp/site-smol:$PYTHONPATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
        # the JSON lives in /tmp between calls (ENGINES=hf then ENGINES=serving when both do not fit one call)
        # the PPO config from this machine's quality run, else the committed H200 one (it needs the RM stage's
        # runs/quality-gpu/rm and models/ from `quality_gpu.sh stage`, e.g. after QUALITY_STAGES="rm dpo")
        MANIFEST=${PPO_MANIFEST:-runs/quality-gpu/ppo/manifest.json}
        [ -f "$MANIFEST" ] || MANIFEST=loadtest/results/h200/alignment/ppo-manifest.json
        $PY tests/gpu/rollout_quality.py --manifest "$MANIFEST" --steps "${PPO_STEPS:-20}" \
            --engines "${ENGINES:-hf,serving}" --work /tmp/rollout-quality --out /tmp/rollout-quality.json \
            || rc=$?
        cp /tmp/rollout-quality.json "$OUT/rollout_quality.json" 2>/dev/null || true
        for f in /tmp/rollout-quality/*.log; do [ -f "$f" ] && tail -60 "$f" > "$OUT/$(basename "$f" | tr '+' '_')"; done
        exit "${rc:-0}" ;;
    smoke)
        $PY -m training.bench throughput --out /tmp/rollout-smoke --shape tiny --stages ppo --plugins ddp \
            --rollout-engines hf,serving --seq 32 --batch 2 --steps 3 --skip 1 | tail -60
        cp /tmp/rollout-smoke/throughput.json "$OUT/throughput.json" ;;
    smoke-quality)  # CPU, after `smoke`: the quality script over the smoke's own PPO manifest, 3 steps per engine
        rm -f /tmp/rollout-smoke-quality.json
        $PY tests/gpu/rollout_quality.py --manifest /tmp/rollout-smoke/runs/ppo-ddp-serving/manifest.json --steps 3 \
            --skip 1 --work /tmp/rollout-smoke-quality --out /tmp/rollout-smoke-quality.json | tail -30
        cp /tmp/rollout-smoke-quality.json "$OUT/rollout_quality.json" ;;
    *) echo "usage: $0 bench|quality|smoke|smoke-quality" >&2; exit 2 ;;
esac
