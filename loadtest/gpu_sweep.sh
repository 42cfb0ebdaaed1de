#!/usr/bin/env bash
# The GPU load test of issue 7: the serving app on a LLaMA-7B-shaped GPTQ 4-bit checkpoint under a 4 GiB budget,
# swept from 1 to the budget's most concurrent sequences, then the same sweep against plain transformers
# `generate` (loadtest.baseline_server, static batches as ColossalChat's inference did), then a summary with peak
# GPU memory (nvidia-smi), the highest load meeting the SLOs and single-stream tok/s against the bandwidth limit.
#
# Usage, from the repo root on the GPU machine (each part fits the 10-minute limit of one `run` call; the
# checkpoint is made once in $CKPT and reused while the machine stays warm):
#   bash loadtest/gpu_sweep.sh project    # make the checkpoint if missing, serve it, sweep  -> $OUT/project/
#   bash loadtest/gpu_sweep.sh baseline   # same checkpoint, same levels, HF generate       -> $OUT/baseline/
#   bash loadtest/gpu_sweep.sh summary    # bandwidth + combined table                      -> $OUT/summary.{json,md}
#   bash loadtest/gpu_sweep.sh all        # the three in a row (about 15 minutes: split it across calls)
# Plots: the GPU machine has no matplotlib; redraw here with `python -m loadtest.report DIR/project DIR/baseline`.
# CPU dry run with the tiny test model: DEVICE=cpu CKPT=/path/tiny MAX_CONC=2 LEVEL_S=5 bash loadtest/gpu_sweep.sh all
set -euo pipefail

PART=${1:-all}
OUT=${OUT:-runs/gpu-sweep}
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
BASELINE_BATCH=${BASELINE_BATCH:-8}
PORT=${PORT:-8000}
BPORT=${BPORT:-8001}
WAIT_S=${WAIT_S:-420}
SERVE_ARGS=${SERVE_ARGS:-}        # extra key=value overrides for python -m serving
PY=${PY:-python3}
mkdir -p "$OUT"
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
    kill -INT -- "-$SERVER" 2>/dev/null || kill -INT "$SERVER" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER" 2>/dev/null || true
    SERVER=""
}
cleanup() { stop_server; stop_sampler; }
trap cleanup EXIT

wait_ready() {  # url log
    local t0=$SECONDS
    until curl -fs -o /dev/null "$1"; do
        if ! kill -0 "$SERVER" 2>/dev/null; then log "error: server exited; last log lines:"; tail -40 "$2" >&2; exit 1; fi
        if (( SECONDS - t0 > WAIT_S )); then log "error: $1 not ready after $WAIT_S s"; tail -40 "$2" >&2; exit 1; fi
        sleep 2
    done
    log "ready after $(( SECONDS - t0 )) s: $1"
}

sweep() {  # url levels outdir
    local slo_args=()
    for s in $SLOS; do slo_args+=(--slo "$s"); done
    "$PY" -m loadtest --url "$1" --model "$NAME" --out "$3" --endpoint "$ENDPOINT" --concurrency "$2" \
        --requests 8 --requests-per-concurrency "$REQS_PER_CONC" --duration "$LEVEL_S" --warmup 2 \
        --input-tokens "$IN_TOK" --tokenizer "$CKPT" --output-tokens "$OUT_TOK" --ignore-eos --timeout 180 \
        --metrics-url "${1%/}/metrics" "${slo_args[@]}" --no-progress --no-plots
}

run_project() {
    make_ckpt
    cat > "$OUT/serve.yaml" <<EOF
model: $CKPT
served_model_name: $NAME
host: 127.0.0.1
port: $PORT
engine:
  device: $DEVICE
  gpu_memory_gb: $BUDGET_GB
EOF
    start_sampler "$OUT/project_gpu_mem.csv"
    log "starting the project server (budget $BUDGET_GB GiB)"
    # shellcheck disable=SC2086
    setsid "$PY" -m serving --config "$OUT/serve.yaml" $SERVE_ARGS > "$OUT/project_server.log" 2>&1 &
    SERVER=$!
    wait_ready "http://127.0.0.1:$PORT/ready" "$OUT/project_server.log"
    local max
    max=${MAX_CONC:-$("$PY" -m loadtest.gpu_report capacity --metrics-url "http://127.0.0.1:$PORT/metrics" \
                      --log "$OUT/project_server.log")}
    echo "$max" > "$OUT/max_concurrency.txt"
    local lv; lv=$("$PY" -m loadtest.gpu_report levels --max "$max")
    log "max concurrency $max; levels $lv"
    sweep "http://127.0.0.1:$PORT" "$lv" "$OUT/project" || log "project sweep: some levels failed"
    curl -fsS "http://127.0.0.1:$PORT/metrics" > "$OUT/project_metrics.txt" || true
    stop_server
    stop_sampler
    command -v ray >/dev/null && ray stop --force >/dev/null 2>&1 || true
}

run_baseline() {
    make_ckpt
    local max=${MAX_CONC:-$(cat "$OUT/max_concurrency.txt" 2>/dev/null || echo 32)}
    local lv; lv=$("$PY" -m loadtest.gpu_report levels --max "$max")
    start_sampler "$OUT/baseline_gpu_mem.csv"
    log "starting the transformers-generate baseline (static batches of $BASELINE_BATCH); levels $lv"
    setsid "$PY" -m loadtest.baseline_server --model "$CKPT" --name "$NAME" --port "$BPORT" \
        --max-batch-size "$BASELINE_BATCH" --device "$DEVICE" > "$OUT/baseline_server.log" 2>&1 &
    SERVER=$!
    wait_ready "http://127.0.0.1:$BPORT/health" "$OUT/baseline_server.log"
    sweep "http://127.0.0.1:$BPORT" "$lv" "$OUT/baseline" || log "baseline sweep: some levels failed"
    stop_server
    stop_sampler
}

run_summary() {
    local extra=()
    [ "$DEVICE" = cuda ] || extra+=(--no-bandwidth)
    "$PY" -m loadtest.gpu_report summary --out "$OUT" --ckpt "$CKPT" "${extra[@]}"
}

case "$PART" in
    project) run_project ;;
    baseline) run_baseline ;;
    summary) run_summary ;;
    all) run_project; run_baseline || log "baseline failed"; run_summary ;;
    *) echo "usage: $0 project|baseline|summary|all" >&2; exit 2 ;;
esac
