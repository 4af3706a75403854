"""Compare the two paths of results/throughput/run.sh: wall times per stage and the runs' results.

    python results/throughput/summarize.py results/throughput/2026-12-01 > results/throughput/2026-12-01/table.md

Reads bench_{replicas,separate}.json (benchmarks/bench_study.py), walls.txt and results_{mode}.csv from
the folder the device call returned; writes summary.json there and prints a Markdown table. Results are
paired by run_id (the same config in both paths): replicas draw dropout / label-dropout / sampling noise
from other streams than separate runs, so the pairs differ by seed-level noise, not by rounding.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path


def walls(folder: Path) -> dict[str, float]:
    out = {}
    for line in (folder / "walls.txt").read_text().splitlines():
        m = re.match(r"(\w+) exit (\d+) wall (\d+)s", line)
        if m:
            out[m.group(1)] = float(m.group(3))
            out[f"{m.group(1)}_exit"] = int(m.group(2))
    return out


def rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path) as fh:
        return {r["run_id"]: r for r in csv.DictReader(fh)}


def _f(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def main(folder: str) -> int:
    root = Path(folder)
    bench = {m: json.loads((root / f"bench_{m}.json").read_text()) for m in ("replicas", "separate")}
    wall = walls(root)
    stages = {m: {k: v["wall_s"] for k, v in b["stages"].items()} for m, b in bench.items()}
    tok = stages["replicas"]["tokenizer training"] + stages["replicas"]["encode"]
    gen_rep, gen_sep = stages["replicas"]["generator training"], stages["separate"]["generator training"]
    rep, sep = rows(root / "results_replicas.csv"), rows(root / "results_separate.csv")
    pairs = []
    for run_id in sorted(rep.keys() & sep.keys()):
        a, b = rep[run_id], sep[run_id]
        pairs.append({"run_id": run_id, "tokenizer": a["tokenizer_label"], "size": a["generator_size"],
                      "steps": int(a["train_steps"]),
                      "val_loss_replicas": _f(a["val_loss"]), "val_loss_separate": _f(b["val_loss"]),
                      "gfd_replicas": _f(a["gfd"]), "gfd_separate": _f(b["gfd"])})
    summary = {
        "device": (root / "device.txt").read_text().strip().splitlines(),
        "wall_s": wall,
        "stage_wall_s_summed_over_jobs": stages,
        "generator_training_ratio_separate_over_replicas": gen_sep / gen_rep if gen_rep else None,
        "generator_runs": {m: bench[m]["generator_runs"] for m in bench},
        "mfu": {m: bench[m]["mfu"] for m in bench},
        "pairs": pairs,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| stage (wall s summed over jobs) | separate | replicas | separate / replicas |")
    print("|---|---|---|---|")
    for name in stages["replicas"]:
        a, b = stages["separate"].get(name, 0.0), stages["replicas"][name]
        ratio = f"{a / b:.2f}" if b and a else "-"
        print(f"| {name} | {a:.1f} | {b:.1f} | {ratio} |")
    print()
    print(f"elapsed: replicas study end to end {wall.get('replicas', math.nan):.0f} s; separate study without "
          f"its tokenizer stage {wall.get('separate', math.nan):.0f} s (+ the same tokenizer stage, "
          f"{tok:.0f} s of job time in the replicas run)")
    print()
    print("| run | tokenizer | size | steps | val loss separate | val loss replicas | gFD separate | gFD replicas |")
    print("|---|---|---|---|---|---|---|---|")
    for p in pairs:
        print(f"| {p['run_id'][:8]} | {p['tokenizer']} | {p['size']} | {p['steps']} | {p['val_loss_separate']:.4f} | "
              f"{p['val_loss_replicas']:.4f} | {p['gfd_separate']:.2f} | {p['gfd_replicas']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
