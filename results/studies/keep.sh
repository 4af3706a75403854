#!/usr/bin/env bash
# Copy what a committed study result keeps from a study folder brought back by run.sh (unpacked
# studies.tgz): the spec, table, logs of the runner, and the tokenizers' records (config, run record,
# done markers, validation curve points, reconstruction metrics, the training log's metrics.jsonl) and the generator runs' and packs' done
# markers, run.json and model.json; no weights, no other per-run generator files (the table holds their numbers), no
# report pages (rebuilt by `twostage study report`) except the report's class grids of samples.
#
#   bash results/studies/keep.sh /tmp/unpacked/crt results/study_crt
set -euo pipefail
src=${1:?study folder}; dest=${2:?destination}
mkdir -p "$dest/report"
for f in study.yaml results.parquet commands.log run.log; do [ -f "$src/$f" ] && cp "$src/$f" "$dest/"; done
[ -f "$src/../device.txt" ] && cp "$src/../device.txt" "$dest/"
if [ -d "$src/tokenizers" ]; then
  (cd "$src" && find tokenizers \( -name config.yaml -o -name run.json -o -path '*/done/*.json' -o -path '*/val/*.json' \
     -o -path '*/eval/recon.json' -o -name metrics.jsonl \) -type f -print0 | tar --null -cf - -T -) | tar -C "$dest" -xf -
fi
# the generator runs' and packs' done markers, run records and model records: each stage's wall time, the
# device it ran on and the model's training FLOPs per token (benchmarks/bench_study.py reads them)
for part in generators packs; do
  [ -d "$src/$part" ] && (cd "$src" && find "$part" -maxdepth 3 \( -path '*/done/*.json' -o -name run.json \
    -o -name model.json \) -type f -print0 \
    | tar --null -cf - -T -) | tar -C "$dest" -xf -
done
# the report's class grids of samples (report/grids/CELL.png + caption): the samples they show do not come back,
# so a report rebuilt from the committed folder shows these instead
[ -d "$src/report/grids" ] && mkdir -p "$dest/report/grids" && cp "$src/report/grids/"* "$dest/report/grids/"
printf '%s\n' "# the report pages and figures are rebuilt by \`twostage study report $dest --bootstrap 200\`" '*.png' 'report.html' \
  '!grids/*.png' > "$dest/report/.gitignore"
