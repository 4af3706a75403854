"""Summarize the CRT codebook-collapse ablation from unpacked study folders (no weights needed).

    python results/crt_collapse/summarize.py /tmp/abl1/crt_ablation /tmp/abl2/crt_entropy \
        --json results/crt_collapse/summary.json > results/crt_collapse/table.md

Per tokenizer run: codebook usage and perplexity of the validation codes (eval recon), rFD, PSNR, the
last logged training CRT loss, and, where its AR generator finished, the stage-2 validation loss and
gFD. The unigram entropy H = ln(perplexity) of the codes is the loss of a context-free model; H minus
the AR loss is what the generator gains from context, which compares tokenizers with different usage
fairly. Rows group by label; cells show mean and 95% t-interval over tokenizer seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from twostage.study.stats import mean_interval  # noqa: E402


def tokenizer_records(study: Path) -> dict[str, dict]:
    spec = yaml.safe_load((study / "study.yaml").read_text())
    labels = {}
    out = {}
    for folder in sorted((study / "tokenizers").iterdir()):
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        recon = folder / "eval" / "recon.json"
        m = json.loads(recon.read_text())["metrics"] if recon.is_file() else {}
        crt = None
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            crt = rec.get("autoencoder/crt", crt)
        out[folder.name] = {"study": spec["name"], "seed": cfg["train"]["seed"], "crt": cfg["crt"],
                            "entropy_weight": cfg["model"]["entropy_weight"], "usage": m.get("codebook_usage"),
                            "perplexity": m.get("codebook_perplexity"), "rfd": m.get("rFD-EffNetLite0"),
                            "psnr": m.get("PSNR"), "train_crt_loss": crt}
        labels[folder.name] = None
    # labels and stage-2 results from the study's table (finished generator runs only)
    table = study / "results.csv"
    if table.is_file():
        import csv

        for row in csv.DictReader(table.open()):
            rec = out.get(row["tokenizer_id"])
            if rec is not None:
                rec.update(label=row["tokenizer_label"], val_loss=float(row["val_loss"]), gfd=float(row["gfd"]))
    for tid, rec in out.items():
        rec.setdefault("label", _label(rec))
    return out


def _label(rec: dict) -> str:
    c = rec["crt"]
    if not c["enabled"]:
        return "baseline" + (f" + entropy {rec['entropy_weight']:g}" if rec["entropy_weight"] else "")
    text = f"CRT w{c['weight']:g} ramp{c['ramp_steps']}"
    text += " stop-grad target" if c["stop_grad_target"] else ""
    return text + (f" + entropy {rec['entropy_weight']:g}" if rec["entropy_weight"] else "")


def cell(values: list) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    i = mean_interval(values)
    return f"{i.mean:.3g} [{i.low:.3g}, {i.high:.3g}]" if i.resolved else f"{i.mean:.3g} (n=1)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    records = []
    for study in args.studies:
        for tid, rec in tokenizer_records(study).items():
            records.append({"tokenizer_id": tid, **rec})
    if args.json:
        args.json.write_text(json.dumps(records, indent=1, sort_keys=True))
    cols = ["usage", "entropy H (nats)", "rFD", "PSNR", "train CRT loss", "AR val loss", "H - AR loss", "gFD"]
    print("| study | tokenizer | seeds | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["study"], r["label"]), []).append(r)
    for (study, label), rs in groups.items():
        h = [math.log(r["perplexity"]) if r["perplexity"] else None for r in rs]
        gain = [hh - r["val_loss"] if hh is not None and r.get("val_loss") is not None else None for hh, r in zip(h, rs)]
        vals = [cell([r["usage"] for r in rs]), cell(h), cell([r["rfd"] for r in rs]), cell([r["psnr"] for r in rs]),
                cell([r["train_crt_loss"] for r in rs]), cell([r.get("val_loss") for r in rs]), cell(gain),
                cell([r.get("gfd") for r in rs])]
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        print(f"| {study} | {label} | {seeds} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
