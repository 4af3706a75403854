#!/usr/bin/env bash
# `twostage demo` as it runs now (study_demo: budget_runs longest) and with its shorter budgets trained
# as separate runs (the previous path, budget_runs=separate), back to back on this machine, each with
# its report; then bench_study on both folders.  Writes $OUT/demo_side_by_side.txt.
#   OUT=results/throughput bash results/throughput/demo_side_by_side.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT}
PY=${PYTHON:-.venv/bin/python}
ROOT=${ROOT:-/tmp/demo_sbs}
rm -rf "$ROOT"; mkdir -p "$ROOT"
JOBS=$($PY -c "from twostage.study.commands import demo_jobs; print(demo_jobs())")
eval "$($PY -c "from twostage.study.commands import DEMO_MALLOC as m; print(' '.join(f'export {k}={v}' for k, v in m.items()))")"  # as `twostage demo`
{
  echo "# $(nproc) CPU cores ($(lscpu | sed -n 's/^Model name: *//p')), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD)"
  for mode in separate longest; do
    start=$(date +%s.%N)
    $PY -m twostage study run study_demo budget_runs=$mode --out "$ROOT/$mode" --jobs-per-gpu "$JOBS" > "$ROOT/$mode.log" 2>&1
    $PY -m twostage study report "$ROOT/$mode" --bootstrap 200 --fit-points all >> "$ROOT/$mode.log" 2>&1
    echo "demo with budget_runs=$mode: $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s end to end (study run + report)"
  done
  for mode in separate longest; do echo "== $mode"; $PY benchmarks/bench_study.py "$ROOT/$mode" 2>/dev/null | sed -n 2,10p; done
  $PY - "$ROOT" <<'PY'
import sys, pyarrow.parquet as pq
a, b = (pq.read_table(f"{sys.argv[1]}/{m}/results.parquet").to_pylist() for m in ("separate", "longest"))
same = all(x["run_id"] == y["run_id"] and x["val_loss"] == y["val_loss"] and x["gfd"] == y["gfd"] for x, y in zip(a, b))
print(f"results tables: {len(a)} and {len(b)} rows; val_loss and gfd identical in every row: {same}")
PY
} | tee "$OUT/demo_side_by_side.txt"
