#!/usr/bin/env bash
# Does CUDA MPS pay for a study's tokenizer jobs? The study's six compiled tokenizer runs sharing one GPU,
# without and then with the MPS daemon, in one device call (results/throughput/README.md §4 measured the
# same benchmark without MPS: 59.9 aggregate steps/s):
#
#   OUT=... bash results/throughput/mps_bench.sh        (carry .carry; writes $OUT/mps_bench.txt, $OUT/mps_choice)
#
# $OUT/mps_choice is 1 when MPS gave at least 1.1x the aggregate steps/s, else 0: the MPS setting for the
# study calls that follow (`MPS=$(cat $OUT/mps_choice) bash results/studies/run.sh`). The first run also
# fills the inductor cache that the study's baseline tokenizers then reuse.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT}
STEPS=${STEPS:-150}
source results/studies/carry_env.sh
source results/studies/mps.sh
rate() { awk '$1 == "true" {print $4}' "$1"; }
$PY benchmarks/bench_tokenizer_run.py --steps "$STEPS" --processes 6 --compile on | tee /tmp/mps0.txt
mps_start
$PY benchmarks/bench_tokenizer_run.py --steps "$STEPS" --processes 6 --compile on | tee /tmp/mps1.txt
mps_stop
off=$(rate /tmp/mps0.txt); on=$(rate /tmp/mps1.txt)
{ echo "# six compiled vq_fmnist_f4 tokenizer runs sharing the GPU, $STEPS steps each; $(date -u +%FT%TZ)"
  echo "# without MPS:"; cat /tmp/mps0.txt; echo "# with MPS:"; cat /tmp/mps1.txt
  echo "aggregate steps/s without MPS $off, with MPS $on"; } > "$OUT/mps_bench.txt"
awk -v a="$off" -v b="$on" 'BEGIN {print (a > 0 && b >= 1.1 * a) ? 1 : 0}' > "$OUT/mps_choice"
echo "MPS choice: $(cat "$OUT/mps_choice") (without $off, with $on aggregate steps/s)"
