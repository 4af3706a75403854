#!/usr/bin/env bash
# Where a study tokenizer step's time goes on the GPU, and what K jobs sharing it get:
#
#   OUT=... bash results/throughput/profile_tokenizer.sh          (carry .carry, as results/studies/run.sh)
#
# ALONE (default "baseline crt cuda_graphs"; also "heuristics"): `train.profile_steps` over steps 100-119 of
# study_crt's tokenizer configs (compiled, as the study runs them), one process alone; each run's table (wall
# and device-busy ms per step, kernels per step, top ops by device time, the copies by caller) lands in
# $OUT/profile/alone_*.txt. REPLICAS=1 adds 3 seeds trained as stacked replicas in one process against 3
# processes (benchmarks/bench_tokenizer_run.py --replicas 3 / --processes 3) -> $OUT/profile/replicas.txt. SHARED (default "default graphs mps"; also
# "heuristics"): PROCESSES (6) compiled baseline jobs at once, STEPS (450) each, aggregate steps/s over the
# window in which all trained (benchmarks/bench_tokenizer_run.py) -> $OUT/profile/shared_ab.txt.
#
# 2026-12-02 (results/throughput/README.md §5): alone, a job is launch-bound (device busy 21% of the wall);
# six jobs sharing the GPU are bound by its ~16 ms of device time per step. The shared A/B of that call
# averaged each run's own step times and is not evidence; this script's A/B is the re-measurement.
#
# EXTRA="..." appends overrides to every run (a CPU smoke test: EXTRA="train.device=cpu train.compile=false
# train.batch_size=4 loss.perceptual=none train.num_workers=0" PROCESSES=2 ALONE=baseline SHARED=default STEPS=6).
#
# Run it after a study call on the same machine, when the inductor cache is warm (compiling the configs
# from cold takes ~2 minutes each).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT}
PROCESSES=${PROCESSES:-6}
source results/studies/carry_env.sh
mkdir -p "$OUT/profile"
COMMON="optim.ae.schedule=cosine train.compile=true train.steps=130 train.profile_steps=[100,120] \
  monitor.val_images=0 train.ckpt_every=1000 train.log_every=50 train.progress=false"
CRT="crt.enabled=true crt.ramp_steps=300 model.entropy_weight=0.1"   # study_crt's +CRT entry
train() {  # NAME SEED EXTRA...
  local name=$1 seed=$2; shift 2
  $PY -m twostage tokenizer train vq_fmnist_f4 $COMMON train.seed=$seed "$@" ${EXTRA:-} --out /tmp/profile_runs/$name \
    > /tmp/profile_runs/$name.log 2>&1 || { echo "$name failed:"; tail -5 /tmp/profile_runs/$name.log; }
  cp /tmp/profile_runs/$name/profile/steps_*.txt "$OUT/profile/$name.txt" 2>/dev/null
}
rm -rf /tmp/profile_runs && mkdir -p /tmp/profile_runs
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/profile/device.txt"; date -u +%FT%TZ | tee -a "$OUT/profile/device.txt"
# ALONE: the single-process profiles to take (each table now ends with the step's copies by caller and shape)
for name in ${ALONE:-baseline crt cuda_graphs}; do
  case $name in
    heuristics) train alone_baseline_cudnn_heuristics 0 train.cudnn_benchmark=false ;;  # the kernels before 2026-12-02
    baseline) train alone_baseline 0 ;;
    crt) train alone_crt 0 $CRT ;;
    # the compiled modules' forward and backward replayed as CUDA graphs (a separate compile: ~2 minutes cold)
    cuda_graphs) train alone_baseline_cuda_graphs 0 train.compile_mode=reduce-overhead ;;
  esac
done
# REPLICAS=1: 3 seeds of the baseline as one joint run of stacked replicas (one process, one vmapped compiled
# loss: `tokenizer train --out R1 R2 R3 --seeds 0 1 2 --pack P`) against 3 processes, each its own run
if [ "${REPLICAS:-0}" = 1 ]; then
  { echo "# 3 seeds stacked in one process"
    $PY benchmarks/bench_tokenizer_run.py --steps "${STEPS:-450}" --replicas 3 --compile on ${EXTRA:-} 2>&1 | tail -2
    echo "# 3 processes"
    OMP_NUM_THREADS=$(( $(nproc) / 3 > 0 ? $(nproc) / 3 : 1 )) \
      $PY benchmarks/bench_tokenizer_run.py --steps "${STEPS:-450}" --processes 3 --compile on ${EXTRA:-} 2>&1 | tail -2
  } | tee "$OUT/profile/replicas.txt"
fi
# SHARED: the study's situation, PROCESSES compiled baseline jobs sharing the GPU, aggregate steps/s over the
# window in which all of them trained (bench_tokenizer_run.py), for each arm: autotuned (the default),
# heuristics, CUDA graphs, and the default with the CUDA MPS daemon running
run_shared() {  # LABEL OVERRIDES...
  local label=$1; shift
  echo "# $label"
  # CPU threads split between the jobs, as the study runner splits them (twostage/study/runner.py)
  OMP_NUM_THREADS=$(( $(nproc) / PROCESSES > 0 ? $(nproc) / PROCESSES : 1 )) \
    $PY benchmarks/bench_tokenizer_run.py --steps "${STEPS:-450}" --processes "$PROCESSES" --compile on "$@" ${EXTRA:-} \
    2>&1 | tail -2
}
{ for arm in ${SHARED:-default graphs mps}; do
    case $arm in
      default) run_shared "train.cudnn_benchmark=null (autotuned)" ;;
      heuristics) run_shared "train.cudnn_benchmark=false" train.cudnn_benchmark=false ;;
      graphs) run_shared "train.compile_mode=reduce-overhead" train.compile_mode=reduce-overhead ;;
      mps) source results/studies/mps.sh && mps_start && run_shared "CUDA MPS daemon on" && mps_stop ;;
    esac
  done; } | tee "$OUT/profile/shared_ab.txt"
for f in "$OUT"/profile/*.txt; do [ "$(basename "$f")" = device.txt ] && continue; echo "== $(basename "$f" .txt)"; sed -n 2,5p "$f"; done
