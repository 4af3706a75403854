#!/usr/bin/env bash
# One device call (< 10 minutes) that runs one or more study specs on the GPU it is given and brings
# back their tables, reports and run records (no weights, no caches, no sample arrays):
#
#   STUDIES="study_crt" JOBS_PER_GPU=6 bash results/studies/run.sh          (carry: .carry)
#
# Each study is `twostage study run SPEC --out /tmp/studies/NAME --jobs-per-gpu K`; several studies run
# at the same time. K is JOBS_PER_GPU (default 4), raised to the study's number of tokenizer runs (configs
# x seeds, from `study run --dry-run`): the tokenizer stage is bound by the GPU's device time, so more jobs
# at once cost none of their aggregate speed, while a tokenizer left waiting for a slot trains alone at the
# end and delays its generators (study_tokens: the ninth of nine tokenizers with K=8 started only in the
# second call; results/studies/README.md). The call's deadline (BUDGET_S, default 540 s) stops whatever is still running; the
# finished runs keep their done markers, `study table` lists exactly those, and `study report` reports
# on them. $OUT/studies.tgz holds /tmp/studies/NAME/ without *.safetensors, caches/, samples.npz
# and reference/*.npz (a study's own reference features: tens of MB); unpacked into results/,
# `twostage study report results/NAME` regenerates the committed report.
#
# Compiled jobs (train.compile) spend 1.5-2 minutes compiling on a fresh machine. The inductor cache of
# the call comes back as $OUT/inductor.tgz (when under 12 MB, so that it fits the 64 MiB carry with
# .carry's wheels and data); copied to .carry/inductor.tgz, the next call starts from it.
# Emoji studies: .carry (47 MB: wheels + Fashion-MNIST) and the emoji bundle (23 MB) exceed the 64 MiB a call
# may carry. Carry instead a git-ignored folder holding .carry/wheels and the bundle (`twostage data prepare
# emoji --bundle .carry_emoji/emoji`; 40 MB in all on 2026-12-02) and link it as .carry before this script.
# MPS=1 starts the CUDA MPS daemon for the call, so the jobs sharing the GPU run their kernels at the
# same time instead of in time slices; skipped with a note where nvidia-cuda-mps-control is missing. For
# six compiled tokenizer jobs on an H200 it measured 0.98x (results/throughput/2026-12-02/mps_bench.txt),
# by a method later found unreliable for shared runs (results/throughput/README.md §5; re-measure with
# `SHARED=mps bash results/throughput/profile_tokenizer.sh`), so it is off unless asked for.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
OUT=${OUT:?set OUT to the folder that receives studies.tgz}
ROOT=${ROOT:-/tmp/studies}
STUDIES=${STUDIES:?name the study specs, e.g. STUDIES="study_crt study_continuous"}
BUDGET_S=${BUDGET_S:-540}
REPORT_S=${REPORT_S:-45}   # kept at the end for table, report and tar
mkdir -p "$ROOT" "$OUT"
export PYTHONUNBUFFERED=1 TWOSTAGE_CACHE=${TWOSTAGE_CACHE:-/tmp/tscache}
source results/studies/carry_env.sh
[ -f .carry/inductor.tgz ] && tar -C "$TORCHINDUCTOR_CACHE_DIR" -xzf .carry/inductor.tgz && echo "inductor cache from .carry"
if [ "${MPS:-0}" = 1 ]; then
  source results/studies/mps.sh && mps_start && trap mps_stop EXIT
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  $PY -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())"
  date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$ROOT/device.txt"

pids=()
for spec in $STUDIES; do
  name=$(basename "$spec" .yaml); name=${name#study_}
  mkdir -p "$ROOT/$name"
  jobs=${JOBS_PER_GPU:-4}
  toks=$($PY -m twostage study run "$spec" ${OVERRIDES:-} --out "$ROOT/$name" --dry-run 2>/dev/null | grep -c '^tok-')
  [ "${toks:-0}" -gt "$jobs" ] && echo "jobs per GPU $jobs -> $toks: one slot per tokenizer run" && jobs=$toks
  run_for=$(( BUDGET_S - REPORT_S - ($(date +%s) - START) ))
  echo "+ twostage study run $spec --out $ROOT/$name --jobs-per-gpu $jobs ${OVERRIDES:-}  (deadline ${run_for}s)"
  # timeout signals the whole process group: the per-job subprocesses stop with the runner
  timeout --kill-after=10 "$run_for" $PY -m twostage study run "$spec" ${OVERRIDES:-} --out "$ROOT/$name" \
    --jobs-per-gpu "$jobs" > "$ROOT/$name/run.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "exit $? (pid $pid)"; done
for spec in $STUDIES; do
  name=$(basename "$spec" .yaml); name=${name#study_}
  $PY -m twostage study table "$ROOT/$name" 2>&1 | tail -2
  timeout 60 $PY -m twostage study report "$ROOT/$name" --bootstrap 200 2>&1 | tail -3
  tail -5 "$ROOT/$name/run.log"
done
cp "$ROOT/device.txt" "$OUT/"
tar -C "$ROOT" --exclude='*.safetensors' --exclude='caches' --exclude='samples.npz' --exclude='reference/*.npz' --exclude='*.pt' \
  --exclude='events.out.tfevents*' -czf "$OUT/studies.tgz" .
# A claim study's cache compresses to 146-172 MB (study_codebook's three calls): far over what can come back, so
# one whose files exceed 120 MB (10x the limit: generated code compresses well) is not compressed at all
raw=$(du -sb "$TORCHINDUCTOR_CACHE_DIR" | cut -f1)
if [ "$raw" -gt 120000000 ]; then echo "inductor cache $raw bytes uncompressed: not returned"
else tar -C "$TORCHINDUCTOR_CACHE_DIR" -czf /tmp/inductor.tgz . && size=$(stat -c %s /tmp/inductor.tgz) &&
  if [ "$size" -lt 12000000 ]; then cp /tmp/inductor.tgz "$OUT/"; else echo "inductor cache $size bytes: not returned"; fi; fi
ls -la "$OUT"; echo "wall $(( $(date +%s) - START ))s"
