#!/usr/bin/env bash
# CPU pre-flight of a study spec before a GPU session: the spec's own grid (every tokenizer config, generator
# size, budget count, the seed design and replica packs, encode, eval recon, sampling, eval gen, table,
# report), shrunk to a few steps, images and samples, so a config or wiring error costs minutes of a CPU
# instead of a device call. Compilation is left out.
#
#   bash results/studies/preflight.sh study_codebook            # ~9 min on 2 CPU cores; exit 0 when it ran
#
# Writes /tmp/preflight_NAME (PREFLIGHT_ROOT); the numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
spec=${1:?name a study spec, e.g. study_codebook}
PY=${PYTHON:-.venv/bin/python}
out=${PREFLIGHT_ROOT:-/tmp}/preflight_$(basename "$spec" .yaml)
# The spec's own tokenizer and generator overrides (model width, schedules, ...) stay; the keys below are
# replaced by the pre-flight's small values, and compilation is dropped.
mapfile -t shrunk < <($PY - "$spec" <<'PYEOF'
import json, sys
from twostage.study.spec import load_spec
spec = load_spec(sys.argv[1])
def shrink(overrides, small):  # a YAML list of quoted items: an item's own value may hold commas
    keep = [o for o in overrides if o.split("=")[0] not in {"train.compile", *(s.split("=")[0] for s in small)}]
    return json.dumps(keep + small)
print("tokenizer.overrides=" + shrink(spec.tokenizer.overrides, ["train.ckpt_every=3", "monitor.val_images=16", "train.batch_size=8"]))
for kind, g in spec.generators.items():
    print(f"generators.{kind}.overrides=" + shrink(g.overrides, ["train.batch_size=8", "val.max_samples=32"]))
PYEOF
)
rm -rf "$out"
start=$(date +%s)
$PY -m twostage study run "$spec" --out "$out" \
  tokenizer.steps=3 "${shrunk[0]}" \
  tokenizer.encode_train_limit=256 tokenizer.encode_val_limit=64 "budgets=[2,3]" "seeds.tokenizer=[0,1]" \
  "seeds.generator=[0,1]" sample.num=32 sample.batch_size=16 eval.reference_max_images=64 eval.recon_max_images=64 \
  eval.batch_size=32 "${shrunk[@]:1}"
$PY -m twostage study report "$out" --bootstrap 20 | tail -1
echo "preflight $spec: ran in $(( $(date +%s) - start )) s ($out)"
