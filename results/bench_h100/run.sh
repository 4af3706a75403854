#!/usr/bin/env bash
# The generator benchmarks in one device call (< 10 minutes):
#   bash results/bench_h100/run.sh                       (OUT set by the device tool; no carry needed)
# Compiling (and, for sampling, capturing CUDA graphs) takes longer than the timing itself. Phase 1
# runs every benchmark once, all at the same time, with a few steps: that fills the inductor caches
# (FX graph + AOT autograd caches, on by default). Phase 2 then times each benchmark alone on the GPU,
# one after the other; its compilation is served from those caches. Only phase 2 numbers are results.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$OUT/device.txt"
left() { echo $(( ${BUDGET_S:-560} - ($(date +%s) - START) )); }
AR_TRAIN=(benchmarks/bench_ar.py --skip-sample --sizes B L)
AR_SAMPLE=(benchmarks/bench_ar.py --skip-train --sample-batches 64 256)
DIT=(benchmarks/bench_dit.py --compile)

echo "== phase 1: warm the compile caches (concurrent, not timed)"
timeout 240 $PY "${AR_TRAIN[@]}" --train-steps 2 --train-warmup 2 > /tmp/warm_ar_train.txt 2>&1 &
timeout 240 $PY "${AR_SAMPLE[@]}" > /tmp/warm_ar_sample.txt 2>&1 &
timeout 240 $PY "${DIT[@]}" --steps 2 --repeats 1 --warmup 2 > /tmp/warm_dit.txt 2>&1 &
wait
echo "phase 1 done at $(( $(date +%s) - START ))s"

echo "== phase 2: timed, one at a time"
run() { local name=$1 cap=$2; shift 2; local t=$(left); [ "$t" -lt "$cap" ] || t=$cap
        [ "$t" -gt 10 ] || { echo "SKIP $name (no time)"; return; }
        echo "+ [$(( $(date +%s) - START ))s] python $* (cap ${t}s)" | tee "$OUT/$name.txt"
        timeout "$t" $PY "$@" --json "$OUT/$name.json" 2>&1 | grep -v Warning | tee -a "$OUT/$name.txt"; }
run bench_ar_train 150 "${AR_TRAIN[@]}" --train-steps 30 --train-warmup 8
run bench_dit 100 "${DIT[@]}" --steps 20 --repeats 3
run bench_ar_sample 150 "${AR_SAMPLE[@]}"
echo "wall $(( $(date +%s) - START ))s"
