#!/usr/bin/env bash
# The GPU load test of issue 7: the serving app on a LLaMA-7B-shaped GPTQ 4-bit checkpoint under a 4 GiB budget,
# swept from 1 to the budget's most concurrent sequences, then the same sweep against plain transformers
# `generate` (loadtest.baseline_server, static batches as ColossalChat's inference did), then a summary with peak
# GPU memory (nvidia-smi), the highest load meeting the SLOs and single-stream tok/s against the bandwidth limit.
#
# Usage, from the repo root on the GPU machine; each part fits the 10-minute limit of one `run` call. Everything
# is written to $WORK (/tmp, kept while the machine stays warm: the checkpoint is made once) and copied to $OUT
# (the folder a `run` call brings back; PACK=1 packs it into one gpu-sweep.tgz) at the end of each part, with
# summary.{json,md} of what exists so far:
#   bash loadtest/gpu_sweep.sh project    # checkpoint if missing, bandwidth, serve it, sweep  -> project/
#   bash loadtest/gpu_sweep.sh baseline   # same checkpoint, same levels, HF generate          -> baseline/
#   bash loadtest/gpu_sweep.sh all        # both in a row (about 12-15 minutes: too long for one call)
# If the machine went cold between the calls, the baseline part remakes the checkpoint and takes MAX_CONC (env,
# else 32); put both parts' folders side by side here and run `python -m loadtest.gpu_report summary --out DIR`.
# Plots: the GPU machine has no matplotlib; redraw here with `python -m loadtest.report DIR/project DIR/baseline`.
# Needs on the GPU machine: the serving stack's wheels (.whl*/install.sh, for `python -m serving`) and gptqmodel
# (for the baseline's GPTQ loading), and shared/tools/make_llama7b_gptq.py (MAKE_GPTQ=PATH to point at it).
# CPU dry run with the tiny test model: PY=.venv/bin/python DEVICE=cpu CKPT=/path/tiny NAME=tiny MAX_CONC=2 \
#   LEVEL_S=5 IN_TOK=16 OUT_TOK=8 bash loadtest/gpu_sweep.sh baseline
set -euo pipefail

PART=${1:-all}
WORK=${WORK:-/tmp/gpu-sweep}
OUT=${OUT:-$WORK}
CKPT=${CKPT:-/tmp/llama7b-gptq}
NAME=${NAME:-llama7b-gptq}
BUDGET_GB=${BUDGET_GB:-4}
DEVICE=${DEVICE:-cuda}
IN_TOK=${IN_TOK:-128}
OUT_TOK=${OUT_TOK:-128}
LEVEL_S=${LEVEL_S:-20}            # measured seconds per level at most
REQS_PER_CONC=${REQS_PER_CONC:-4} # measured requests per level: max(8, this x concurrency)
SLOS=${SLOS:-"ttft_p95<1s itl_p95<100ms"}
ENDPOINT=${ENDPOINT:-completions}
IGNORE_EOS=${IGNORE_EOS:-0}       # 1: send ignore_eos (vLLM's extension; the server must accept it). A random
                                  # 32k-vocabulary model emits EOS about once in 32,000 tokens anyway.
BASELINE_BATCH=${BASELINE_BATCH:-8}
PORT=${PORT:-8000}
BPORT=${BPORT:-8001}
WAIT_S=${WAIT_S:-420}
SERVE_ARGS=${SERVE_ARGS:-}        # extra key=value overrides for python -m serving
MAX_NUM_SEQS=${MAX_NUM_SEQS:-64}  # upper bound only: the 4 GiB budget decides how many slots fit
if [ "$DEVICE" = cuda ]; then SERVE_CONFIG=${SERVE_CONFIG:-serving/configs/gptq-4gb.yaml}
else SERVE_CONFIG=${SERVE_CONFIG:-serving/configs/cpu-small.yaml}; fi
PY=${PY:-python3}
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)
OUT=$(cd "$OUT" && pwd)

# Carried cp312 wheels (the GPU machine's Python); skipped elsewhere, e.g. in a CPU dry run.
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    for inst in .whl*/install.sh; do
        if [ -f "$inst" ]; then eval "$(bash "$inst")"; fi
    done
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

log() { echo "[gpu_sweep $(date -u +%H:%M:%S)] $*" >&2; }

make_ckpt() {
    if [ -f "$CKPT/config.json" ]; then log "checkpoint $CKPT exists"; return; fi
    local tool=${MAKE_GPTQ:-}
    for t in "$tool" ../shared/tools/make_llama7b_gptq.py shared/tools/make_llama7b_gptq.py \
             /work/shared/tools/make_llama7b_gptq.py; do
        if [ -n "$t" ] && [ -f "$t" ]; then tool=$t; break; fi
    done
    [ -f "$tool" ] || { log "error: make_llama7b_gptq.py not found (set MAKE_GPTQ=PATH or carry shared/tools)"; exit 2; }
    log "writing the 7B-shaped GPTQ checkpoint to $CKPT with $tool"
    "$PY" "$tool" "$CKPT"
    "$PY" -m loadtest.gpu_report tokenizer --ckpt "$CKPT"  # every sampled id must decode to visible text
}

SAMPLER=""
start_sampler() {  # nvidia-smi memory.used every 200 ms -> $1
    if command -v nvidia-smi >/dev/null && [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" 2>/dev/null &
        SAMPLER=$!
    fi
}
stop_sampler() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; SAMPLER=""; }

SERVER=""
stop_server() {
    [ -z "$SERVER" ] && return
    local group
    group=$(ps -o pgid= -p "$SERVER" 2>/dev/null | tr -d ' ')  # setsid made it a group leader: Ray's children too
    [ "$group" = "$SERVER" ] || group=""  # never signal a group the server does not lead (ours)
    if [ -z "$group" ]; then
        kill -INT "$SERVER" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER" 2>/dev/null || true
        SERVER=""
        return
    fi
    kill -INT -- "-$group" 2>/dev/null || kill -INT "$SERVER" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$group" 2>/dev/null || true
    SERVER=""
}
to_out() {  # $WORK -> $OUT: as files, or with PACK=1 as one gpu-sweep.tgz (a device call brings back 8 files at most)
    [ "$OUT" = "$WORK" ] && return 0
    if [ "${PACK:-0}" = 1 ]; then tar -C "$WORK" -czf "$OUT/gpu-sweep.tgz" .; else cp -r "$WORK/." "$OUT/"; fi
}
cleanup() {  # also on failure: the logs go back with $OUT
    stop_server
    stop_sampler
    to_out 2>/dev/null || true
}
trap cleanup EXIT

http_ok() {  # GET $1 answers 200 (no curl needed)
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1" 2>/dev/null
}

wait_ready() {  # url log
    local t0=$SECONDS
    until http_ok "$1"; do
        if ! kill -0 "$SERVER" 2>/dev/null; then log "error: server exited; last log lines:"; tail -40 "$2" >&2; exit 1; fi
        if grep -q -m1 "model load failed" "$2"; then  # Ray would restart the replica forever: stop at once
            log "error: the model failed to load:"; grep -m3 -E "EngineError|budget fit|Error:" "$2" >&2; exit 1
        fi
        if (( SECONDS - t0 > WAIT_S )); then log "error: $1 not ready after $WAIT_S s"; tail -40 "$2" >&2; exit 1; fi
        sleep 2
    done
    log "ready after $(( SECONDS - t0 )) s: $1"
}

sweep() {  # url levels outdir
    local slo_args=()
    for s in $SLOS; do slo_args+=(--slo "$s"); done
    [ "$IGNORE_EOS" = 1 ] && slo_args+=(--ignore-eos)
    "$PY" -m loadtest --url "$1" --model "$NAME" --out "$3" --endpoint "$ENDPOINT" --concurrency "$2" \
        --requests 8 --requests-per-concurrency "$REQS_PER_CONC" --duration "$LEVEL_S" --warmup 2 \
        --input-tokens "$IN_TOK" --tokenizer "$CKPT" --output-tokens "$OUT_TOK" --timeout 180 \
        --metrics-url "${1%/}/metrics" "${slo_args[@]}" --no-progress --no-plots
}

facts() {  # weight bytes and copy bandwidth, measured while no server holds the GPU
    local extra=()
    [ "$DEVICE" = cuda ] || extra+=(--no-bandwidth)
    "$PY" -m loadtest.gpu_report facts --out "$WORK" --ckpt "$CKPT" "${extra[@]}"
}

run_project() {
    make_ckpt
    facts
    start_sampler "$WORK/project_gpu_mem.csv"
    log "starting the project server ($SERVE_CONFIG, budget $BUDGET_GB GiB, at most $MAX_NUM_SEQS sequences)"
    # shellcheck disable=SC2086
    setsid "$PY" -m serving --config "$SERVE_CONFIG" --model "$CKPT" served_model_name="$NAME" host=127.0.0.1 \
        port="$PORT" engine.device="$DEVICE" engine.gpu_memory_gb="$BUDGET_GB" engine.max_num_seqs="$MAX_NUM_SEQS" \
        deployment.max_ongoing_requests=$(( MAX_NUM_SEQS + 64 )) $SERVE_ARGS > "$WORK/project_server.log" 2>&1 &
    SERVER=$!
    wait_ready "http://127.0.0.1:$PORT/ready" "$WORK/project_server.log"
    local max
    max=${MAX_CONC:-$("$PY" -m loadtest.gpu_report capacity --metrics-url "http://127.0.0.1:$PORT/metrics" \
                      --log "$WORK/project_server.log")}
    echo "$max" > "$WORK/max_concurrency.txt"
    local lv; lv=$("$PY" -m loadtest.gpu_report levels --max "$max")
    log "max concurrency $max; levels $lv"
    sweep "http://127.0.0.1:$PORT" "$lv" "$WORK/project" || log "project sweep: some levels failed"
    "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
        "http://127.0.0.1:$PORT/metrics" > "$WORK/project_metrics.txt" || true
    stop_server
    stop_sampler
    command -v ray >/dev/null && ray stop --force >/dev/null 2>&1 || true
    gpu_idle
}

gpu_idle() {  # wait (30 s at most) until the GPU has given the server's memory back, for clean baseline readings
    command -v nvidia-smi >/dev/null && [ "$DEVICE" = cuda ] || return 0
    local used
    for _ in $(seq 1 30); do
        used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
        (( ${used:-0} < 1024 )) && return 0
        sleep 1
    done
    log "warning: ${used} MiB still in use on the GPU"
}

run_baseline() {
    make_ckpt
    gpu_idle
    facts
    local max=${MAX_CONC:-$(cat "$WORK/max_concurrency.txt" 2>/dev/null || echo 32)}
    local lv; lv=$("$PY" -m loadtest.gpu_report levels --max "$max")
    start_sampler "$WORK/baseline_gpu_mem.csv"
    log "starting the transformers-generate baseline (static batches of $BASELINE_BATCH); levels $lv"
    setsid "$PY" -m loadtest.baseline_server --model "$CKPT" --name "$NAME" --port "$BPORT" \
        --max-batch-size "$BASELINE_BATCH" --device "$DEVICE" > "$WORK/baseline_server.log" 2>&1 &
    SERVER=$!
    wait_ready "http://127.0.0.1:$BPORT/health" "$WORK/baseline_server.log"
    sweep "http://127.0.0.1:$BPORT" "$lv" "$WORK/baseline" || log "baseline sweep: some levels failed"
    stop_server
    stop_sampler
}

publish() {  # summary of what exists, then everything to $OUT
    "$PY" -m loadtest.gpu_report summary --out "$WORK" || log "summary failed"
    to_out
    log "results in $OUT"
}

case "$PART" in
    project) run_project; publish ;;
    baseline) rc=0; run_baseline || rc=$?; publish; exit $rc ;;
    summary) publish ;;
    all) run_project; publish; run_baseline || log "baseline failed"; publish ;;
    *) echo "usage: $0 project|baseline|summary|all" >&2; exit 2 ;;
esac
