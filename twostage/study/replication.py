"""Does a study's conclusion hold when the study is run again?

    twostage study replication ORIGINAL RERUN [--out replication.md]

Both folders are studies of one spec with a report (`twostage study report DIR` writes DIR/report/
fits.json). The test a claim must pass (the "Studies whose conclusions replicate" issue): every verdict
of ORIGINAL that names a winner names the same winner in RERUN, run with seeds that are not ORIGINAL's.
Verdicts are matched by what they compare (stage, metric, generator cell and budget, the two tokenizer
labels), and each pair gets a status:

  holds              the same winner in both
  contradicted       the other tokenizer wins in RERUN
  not replicated     RERUN cannot tell them apart: ORIGINAL's winner rested on too little evidence
  resolved in re-run ORIGINAL could not tell them apart, RERUN can (not a failure: more power or luck)
  tie in both        not distinguishable in both
  only in original / only in re-run   the grids differ (a run failed, a budget was added)

The command exits 1 when a winner of ORIGINAL does not hold, so it can gate a committed claim.

When both folders hold tokenizer runs with the same job id (the same configuration and seed trained
twice, e.g. on two machines), their reconstruction metrics are listed side by side: GPU kernels are not
deterministic, so one seed does not pin one tokenizer, and that spread is part of what seeds sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from twostage import config as configlib
from twostage.common.errors import UserError
from twostage.study.spec import load_spec

__all__ = ["Verdict", "Replication", "load_verdicts", "compare_verdicts", "tokenizer_reruns", "replication_report",
           "spec_differences", "folder_spec",
           "HOLDS", "CONTRADICTED", "NOT_REPLICATED", "RESOLVED", "TIE", "ONLY_ORIGINAL", "ONLY_RERUN"]

HOLDS, CONTRADICTED, NOT_REPLICATED = "holds", "contradicted", "not replicated"
RESOLVED, TIE, ONLY_ORIGINAL, ONLY_RERUN = "resolved in re-run", "tie in both", "only in original", "only in re-run"
RECON_NAMES = {"rfd": "rFD", "psnr": "PSNR", "ssim": "SSIM", "codebook_usage": "codebook usage"}


@dataclass(frozen=True)
class Verdict:
    stage: str  # "generation" | "reconstruction" | "context gain"
    metric: str  # the series as the report names it (FD-EffNetLite0, val loss ..., rFD)
    where: str  # "ar tiny, 1000 steps"; "" for a tokenizer comparison
    pair: tuple[str, str]  # the two tokenizer labels, sorted
    winner: str | None
    evidence: str  # the difference and its interval, "a - b = m [lo, hi], N seeds"

    @property
    def key(self) -> tuple[str, str, str, tuple[str, str]]:
        return self.stage, self.metric, self.where, self.pair


@dataclass(frozen=True)
class Replication:
    original: Verdict | None
    rerun: Verdict | None
    status: str

    @property
    def verdict(self) -> Verdict:
        return self.original or self.rerun  # type: ignore[return-value]

    @property
    def failed(self) -> bool:
        """A winner of the original that the re-run does not confirm."""
        return self.original is not None and self.original.winner is not None and self.status != HOLDS


def _evidence(d: dict[str, Any]) -> str:
    diff = d.get("difference") or {}
    n = diff.get("n_a") or d.get("seeds_a") or "?"
    if diff.get("low") is None or diff.get("high") is None:  # one seed: a difference without an interval
        return f"{d['label_a']} - {d['label_b']} = {diff.get('mean', float('nan')):.3g}, {n} seed (no interval)"
    return (f"{d['label_a']} - {d['label_b']} = {diff['mean']:.3g} [{diff['low']:.3g}, {diff['high']:.3g}], "
            f"{n} seeds")


def _winner(d: dict[str, Any]) -> str | None:
    if "winner" in d:
        return d["winner"]
    verdict = str(d.get("verdict", ""))  # reports written before verdicts carried their winner
    return verdict.removesuffix(" better") if verdict.endswith(" better") else None


def load_verdicts(folder: str | Path) -> list[Verdict]:
    """Every verdict of a study's report (DIR/report/fits.json)."""
    path = Path(folder) / "report" / "fits.json"
    if not path.is_file():
        raise UserError(f"{path} not found: write the study's report first (`twostage study report {folder}`)")
    fits = json.loads(path.read_text())
    for key in ("verdicts", "context_gain_verdicts", "reconstruction_verdicts"):  # pairs the report did not
        fits[key] = [d for d in fits.get(key, []) if d.get("verdict") != "not compared"]  # compare claim nothing
    out: list[Verdict] = []
    for d in fits.get("verdicts", []):
        where = f"{d['generator_kind']} {d['generator_size']}, {d['train_steps']} steps"
        out.append(Verdict("generation", d.get("series") or d["metric"], where,
                           tuple(sorted((d["label_a"], d["label_b"]))), _winner(d), _evidence(d)))
    for d in fits.get("context_gain_verdicts", []):
        where = f"{d['generator_kind']} {d['generator_size']}, {d['train_steps']} steps"
        out.append(Verdict("context gain", "unigram entropy - val loss", where,
                           tuple(sorted((d["label_a"], d["label_b"]))), _winner(d), _evidence(d)))
    labels = _tokenizer_labels(fits)
    for d in fits.get("reconstruction_verdicts", []):
        la, lb = d.get("label_a") or labels.get(d["a"], d["a"]), d.get("label_b") or labels.get(d["b"], d["b"])
        d = {**d, "label_a": la, "label_b": lb}
        out.append(Verdict("reconstruction", RECON_NAMES.get(d["metric"], d["metric"]), "", tuple(sorted((la, lb))),
                           _winner(d), _evidence(d)))
    return out


def _tokenizer_labels(fits: dict[str, Any]) -> dict[str, str]:
    """{tokenizer cell: label} from the generation verdicts (reports whose stage-1 verdicts lack labels)."""
    labels: dict[str, str] = {}
    for d in fits.get("verdicts", []):
        labels.setdefault(d["a"], d["label_a"])
        labels.setdefault(d["b"], d["label_b"])
    return labels


def _status(original: Verdict | None, rerun: Verdict | None) -> str:
    if rerun is None:
        return ONLY_ORIGINAL
    if original is None:
        return ONLY_RERUN
    if original.winner is None:
        return TIE if rerun.winner is None else RESOLVED
    if rerun.winner is None:
        return NOT_REPLICATED
    return HOLDS if rerun.winner == original.winner else CONTRADICTED


def compare_verdicts(original: Iterable[Verdict], rerun: Iterable[Verdict]) -> list[Replication]:
    a = {v.key: v for v in original}
    b = {v.key: v for v in rerun}
    keys = list(a) + [k for k in b if k not in a]
    return [Replication(a.get(k), b.get(k), _status(a.get(k), b.get(k))) for k in keys]


def spec_differences(original: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """The settings two study specs set differently, seeds aside ("tokenizer.steps: 2000 -> 3000"): a
    re-run is a replication of the original's verdicts only where these are none; otherwise it tests
    whether the verdicts survive the change."""
    a, b = (configlib.flatten({k: v for k, v in spec.items() if k != "seeds"}) for spec in (original, rerun))
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in list(a) + [k for k in b if k not in a]
            if a.get(k) != b.get(k)]


def folder_spec(folder: Path) -> dict[str, Any] | None:
    """The folder's spec with every default filled in (specs saved by older code leave some out), or as
    written when this code cannot load it."""
    path = folder / "study.yaml"
    if not path.is_file():
        return None
    try:
        return configlib.to_dict(load_spec(path))
    except (UserError, ValueError, TypeError):
        return yaml.safe_load(path.read_text())


def _seeds(folder: Path) -> dict[str, list[int]]:
    fits = json.loads((folder / "report" / "fits.json").read_text())
    return (fits.get("design") or {}).get("seeds") or {}


def tokenizer_reruns(original: str | Path, rerun: str | Path) -> list[dict[str, Any]]:
    """Tokenizer runs with the same job id in both studies (one configuration and seed trained twice):
    their reconstruction metrics (eval/recon.json) side by side."""
    rows = []
    a_root, b_root = Path(original) / "tokenizers", Path(rerun) / "tokenizers"
    if not a_root.is_dir() or not b_root.is_dir():
        return rows
    for run in sorted(a_root.iterdir()):
        a_rec, b_rec = run / "eval" / "recon.json", b_root / run.name / "eval" / "recon.json"
        if not (a_rec.is_file() and b_rec.is_file()):
            continue
        ma, mb = json.loads(a_rec.read_text())["metrics"], json.loads(b_rec.read_text())["metrics"]
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        rows.append({"id": run.name, "seed": (config.get("train") or {}).get("seed"),
                     "crt": bool((config.get("crt") or {}).get("enabled")),
                     "metrics": {k: (ma[k], mb[k]) for k in ma if k in mb and isinstance(ma[k], (int, float))}})
    return rows


def replication_report(original: str | Path, rerun: str | Path) -> tuple[str, list[Replication]]:
    """(the markdown report, the matched verdicts). A folder without a report has no verdicts to match:
    that is an error, unless the two folders share tokenizer runs, whose table is then the report."""
    original, rerun = Path(original), Path(rerun)
    reruns = tokenizer_reruns(original, rerun)
    lines = [f"# Replication: {original} -> {rerun}", ""]
    try:
        rows = compare_verdicts(load_verdicts(original), load_verdicts(rerun))
    except UserError as err:
        if not reruns:
            raise
        rows = []
        lines.append(f"No verdicts compared: {err}")
    else:
        lines += _verdict_lines(original, rerun, rows)
    if reruns:
        names = list(reruns[0]["metrics"])
        lines += ["", "## The same tokenizer runs trained in both (same configuration and seed)", "",
                  "original / re-run; the spread is the runs' nondeterminism (GPU kernels), not their seeds.", "",
                  "| run | seed | CRT | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for t in reruns:
            lines.append(f"| {t['id']} | {t['seed']} | {'yes' if t['crt'] else 'no'} | "
                         + " | ".join(f"{a:.4g} / {b:.4g}" for a, b in t["metrics"].values()) + " |")
    return "\n".join(lines) + "\n", rows


def _verdict_lines(original: Path, rerun: Path, rows: list[Replication]) -> list[str]:
    sa, sb = _seeds(original), _seeds(rerun)
    lines = [f"Seeds: original tokenizer {sa.get('tokenizer')}, generator {sa.get('generator')}; re-run "
             f"tokenizer {sb.get('tokenizer')}, generator {sb.get('generator')}."]
    shared = {k: sorted(set(sa.get(k, [])) & set(sb.get(k, []))) for k in ("tokenizer", "generator")}
    if any(shared.values()):
        common = ", ".join(f"{k} {v}" for k, v in shared.items() if v)
        lines.append(f"The re-run shares seeds with the original ({common}): an independent check of the verdicts "
                     "uses other seeds.")
    spec_a, spec_b = folder_spec(original), folder_spec(rerun)
    changed = spec_differences(spec_a, spec_b) if spec_a is not None and spec_b is not None else []
    if changed:
        lines.append("The specs differ beyond seeds, so this tests whether the verdicts survive the change, not a "
                     "replication of one spec: " + "; ".join(f"`{c}`" for c in changed) + ".")
    winners = [r for r in rows if r.original is not None and r.original.winner is not None]
    failed = [r for r in winners if r.failed]
    counts = {s: sum(r.status == s for r in rows) for s in
              (HOLDS, CONTRADICTED, NOT_REPLICATED, RESOLVED, TIE, ONLY_ORIGINAL, ONLY_RERUN)}
    lines += ["", f"**{len(winners) - len(failed)} of {len(winners)} winners of the original hold in the re-run**"
              + (f"; {len(failed)} do not." if failed else "."),
              "Statuses: " + ", ".join(f"{s} {n}" for s, n in counts.items() if n) + ".", "",
              "| stage | metric | where | pair | original | re-run | status |", "|---|---|---|---|---|---|---|"]

    def cell(v: Verdict | None) -> str:
        return "—" if v is None else f"{v.winner or 'not distinguishable'}: {v.evidence}"

    for r in rows:
        v = r.verdict
        lines.append(f"| {v.stage} | {v.metric} | {v.where or '—'} | {' vs '.join(v.pair)} | {cell(r.original)} | "
                     f"{cell(r.rerun)} | {'**' + r.status + '**' if r.failed else r.status} |")
    return lines
