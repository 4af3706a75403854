#!/usr/bin/env bash
# Where a study tokenizer step's time goes on the GPU: `train.profile_steps` (twostage/engine/profiling.py)
# over steps 100-119 of study_crt's two tokenizer configs (baseline, +CRT; compiled, as the study runs
# them), first one process alone (the baseline also with cuDNN's heuristic algorithm choice,
# train.cudnn_benchmark=false, as the engine ran before it autotuned, and with CUDA graphs,
# train.compile_mode=reduce-overhead, unless GRAPHS=0); each run's table (wall and device-busy ms per step,
# kernels per step, top ops by device time) lands in $OUT/profile/. Then PROCESSES (6) compiled baseline
# jobs at once, the study's situation, for each kernel choice (benchmarks/bench_tokenizer_run.py: aggregate
# steps/s, $OUT/profile/shared_ab.txt):
#
#   OUT=... bash results/throughput/profile_tokenizer.sh          (carry .carry, as results/studies/run.sh)
#
# The eager tokenizer of 2026-12-01 was profiled once (tokenizer_profile/: ~33 ms of GPU work per step,
# led by convolution backward, GroupNorm, NCHW<->NHWC conversions and the perceptual network's native
# depthwise kernels); this one profiles the compiled channels_last jobs the studies run now.
#
# EXTRA="..." appends overrides to every run (a CPU smoke test: EXTRA="train.device=cpu train.compile=false
# train.batch_size=4 loss.perceptual=none train.num_workers=0" PROCESSES=1 GRAPHS=0).
#
# Read: busy / wall of a lone process says whether one job is launch-bound; K x (a lone job's busy ms)
# against the shared runs' ms per step says whether K jobs fill the GPU. Run it after a study call on the
# same machine, when the inductor cache is warm (compiling the two configs from cold takes ~2 minutes).
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
train alone_baseline_cudnn_heuristics 0 train.cudnn_benchmark=false   # the engine's kernels before 2026-12-02
train alone_baseline 0
train alone_crt 0 $CRT
# the compiled modules' forward and backward replayed as CUDA graphs (a separate compile: ~2 minutes cold)
[ "${GRAPHS:-1}" = 1 ] && train alone_baseline_cuda_graphs 0 train.compile_mode=reduce-overhead
# the study's situation: six compiled baseline jobs sharing the GPU, aggregate steps/s for each kernel choice
{ for variant in train.cudnn_benchmark=false train.cudnn_benchmark=true train.compile_mode=reduce-overhead; do
    [ "$variant" = train.compile_mode=reduce-overhead ] && [ "${GRAPHS:-1}" != 1 ] && continue
    echo "# $variant"
    # CPU threads split between the jobs, as the study runner splits them (twostage/study/runner.py)
    OMP_NUM_THREADS=$(( $(nproc) / PROCESSES > 0 ? $(nproc) / PROCESSES : 1 )) \
      $PY benchmarks/bench_tokenizer_run.py --steps 450 --processes "$PROCESSES" --compile on $variant ${EXTRA:-} 2>&1 | tail -2
  done; } | tee "$OUT/profile/shared_ab.txt"
for f in "$OUT"/profile/*.txt; do [ "$(basename "$f")" = device.txt ] && continue; echo "== $(basename "$f" .txt)"; sed -n 2,5p "$f"; done
