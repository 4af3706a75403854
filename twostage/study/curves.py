"""Tokenizer training curves of a study: validation rFD, PSNR and codebook usage against the training
step, per tokenizer cell and seed, and whether each tokenizer's rFD had stopped improving by the end.

A claim about tokenizers compares trained tokenizers; if one of them was still improving when training
stopped, the comparison measures training length as much as the design. Every tokenizer run with
`monitor.val_images` set writes RUN/val/step_XXXXXXX.json at each checkpoint
(twostage/tokenizers/autoencoder_task.py): "psnr", "rFD-<network>", and "codebook_usage" for discrete
codes. Runs without those files are read from the val/* keys of their metrics.jsonl. The curve of
codebook usage is also drawn from the training log's window statistic (`TRAIN_USAGE`), which every VQ
run logs.

Verdict per tokenizer cell (`PLATEAU` = 2%, of the last value):
  plateaued            for every seed, the rFD of the last two checkpoints differs by less than 2%;
  still improving      some seed's rFD fell by 2% or more over its last checkpoint interval (the
                       largest fall is named);
  not settled          no seed fell by 2%, but some seed's rFD rose by 2% or more;
  too few checkpoints  a seed has fewer than two validation points (or none while others have some);
  no validation curve  no seed has any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

PLATEAU = 0.02  # a change of rFD below this fraction of its last value counts as a plateau
TRAIN_USAGE = "autoencoder/usage"  # the VQ task's codebook usage over its window, as the engine logs it
VAL_PREFIX = "val/"  # the validation's keys in metrics.jsonl; the val records hold them without it
Points = list[tuple[int, float]]

__all__ = ["PLATEAU", "TRAIN_USAGE", "SeedCurve", "TokenizerCurves", "read_run", "convergence",
           "tokenizer_curves"]


@dataclass
class SeedCurve:
    """One tokenizer run: its validation points by step, and the training log's codebook usage."""

    seed: int
    run: str | None  # the run folder, relative to the study folder
    rfd_name: str | None = None  # e.g. "rFD-EffNetLite0", as the records name it
    val: dict[str, Points] = field(default_factory=dict)  # "rfd" | "psnr" | "codebook_usage" -> points
    train_usage: Points = field(default_factory=list)

    def last_change(self) -> tuple[float, int, int] | None:
        """(rFD change over the last checkpoint interval as a fraction of the last value, first step,
        last step); None with fewer than two points."""
        rfd = self.val.get("rfd", [])
        if len(rfd) < 2:
            return None
        (s0, v0), (s1, v1) = rfd[-2], rfd[-1]
        if v1 == 0:  # an exact reconstruction set: any earlier value was a fall
            return (0.0 if v0 == 0 else float("-inf")), s0, s1
        return (v1 - v0) / abs(v1), s0, s1


@dataclass
class TokenizerCurves:
    """The curves of one tokenizer cell (all its seeds) and their convergence verdict."""

    cell: str
    label: str
    seeds: list[SeedCurve]
    status: str  # plateaued | still improving | not settled | too few checkpoints | no validation curve
    verdict: str  # the status with its evidence, one line

    @property
    def rfd_name(self) -> str | None:
        return next((s.rfd_name for s in self.seeds if s.rfd_name), None)

    def brief(self) -> dict[str, Any]:
        """What fits.json records: the verdict and each seed's last validation point."""
        last = {str(s.seed): {k: {"step": v[-1][0], "value": v[-1][1]} for k, v in s.val.items() if v}
                for s in self.seeds}
        return {"tokenizer_cell": self.cell, "label": self.label, "status": self.status, "verdict": self.verdict,
                "rfd_name": self.rfd_name, "plateau_threshold": PLATEAU, "last": last}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The parseable JSON objects of a .jsonl file ([] when it is missing)."""
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            out.append(row)
    return out


def _val_records(run_dir: Path) -> list[dict[str, Any]]:
    """RUN/val/step_*.json, or else the val/* keys of metrics.jsonl (prefix removed), by step."""
    records = []
    for path in sorted((run_dir / "val").glob("step_*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # written atomically, but a hand-edited file must not stop the report
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        for row in _json_lines(run_dir / "metrics.jsonl"):
            vals = {k[len(VAL_PREFIX):]: v for k, v in row.items() if k.startswith(VAL_PREFIX)}
            if vals:
                records.append({"step": row["step"], **vals})
    return sorted(records, key=lambda r: r["step"])


def _rfd_key(keys: Sequence[str]) -> str | None:
    """The reconstruction FD among a record's keys, whatever its network (rFID only for Inception)."""
    return next((k for k in sorted(keys) if k == "rFID" or k.startswith("rFD-")), None)


def read_run(run_dir: Path, seed: int, run: str | None) -> SeedCurve:
    """The curves of one tokenizer run folder (empty when it is missing or recorded nothing)."""
    curve = SeedCurve(seed, run)
    for record in _val_records(run_dir):
        rfd = _rfd_key(list(record))
        curve.rfd_name = curve.rfd_name or rfd
        for name, key in (("rfd", rfd), ("psnr", "psnr"), ("codebook_usage", "codebook_usage")):
            value = record.get(key) if key else None
            if isinstance(value, (int, float)):
                curve.val.setdefault(name, []).append((record["step"], float(value)))
    curve.train_usage = [(r["step"], float(r[TRAIN_USAGE])) for r in _json_lines(run_dir / "metrics.jsonl")
                         if isinstance(r.get(TRAIN_USAGE), (int, float))]
    return curve


def convergence(seeds: Sequence[SeedCurve]) -> tuple[str, str]:
    """(status, verdict line) of a tokenizer cell's seeds; see the module docstring."""
    with_points = [s for s in seeds if s.val.get("rfd")]
    if not with_points:
        return "no validation curve", "no validation curve (no RUN/val records: train with monitor.val_images > 0)"
    changes = {s.seed: s.last_change() for s in seeds}
    falls = {seed: c for seed, c in changes.items() if c is not None and c[0] <= -PLATEAU}
    if falls:
        seed, (change, s0, s1) = min(falls.items(), key=lambda kv: kv[1][0])
        return "still improving", (f"still improving (rFD fell {100 * -change:.1f}% over the last checkpoint interval, "
                                   f"seed {seed}, steps {s0}→{s1})")
    rises = {seed: c for seed, c in changes.items() if c is not None and c[0] >= PLATEAU}
    if rises:
        seed, (change, s0, s1) = max(rises.items(), key=lambda kv: kv[1][0])
        return "not settled", (f"not settled (rFD rose {100 * change:.1f}% over the last checkpoint interval, "
                               f"seed {seed}, steps {s0}→{s1})")
    short = sorted(seed for seed, c in changes.items() if c is None)
    if short:
        return "too few checkpoints", (f"too few checkpoints to tell (seed{'s' if len(short) > 1 else ''} "
                                       f"{', '.join(map(str, short))}: fewer than two validation points)")
    worst = max(abs(c[0]) for c in changes.values())
    last = max(c[2] for c in changes.values())
    n = len(seeds)
    return "plateaued", (f"plateaued (rFD changed at most {100 * worst:.1f}% over the last checkpoint interval, "
                         f"{n} seed{'s' if n > 1 else ''}, last step {last})")


def tokenizer_curves(rows: Sequence[dict[str, Any]], directory: Path, labels: dict[str, str]) -> list[TokenizerCurves]:
    """The curves and verdict of every tokenizer cell in the (normalised) results rows, in label order,
    from the run folders their tokenizer_run column names (relative to the study folder)."""
    runs: dict[str, dict[int, str | None]] = {}
    for r in rows:
        seeds = runs.setdefault(r["tokenizer_cell"], {})
        if seeds.get(r["tokenizer_seed"]) is None:
            seeds[r["tokenizer_seed"]] = r.get("tokenizer_run")
    out = []
    for cell, seeds in runs.items():
        curves = [read_run(Path(directory) / run, seed, run) if run else SeedCurve(seed, None)
                  for seed, run in sorted(seeds.items())]
        status, verdict = convergence(curves)
        out.append(TokenizerCurves(cell, labels[cell], curves, status, verdict))
    return sorted(out, key=lambda c: (c.label, c.cell))
