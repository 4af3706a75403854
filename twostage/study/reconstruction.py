"""Stage-1 verdicts: is tokenizer A's reconstruction better than B's, over its training seeds?

    tokenizer_comparisons(rows)     # every pair of tokenizer cells on rFD, PSNR, SSIM, codebook usage
    reconstruction_lines(comparisons, labels, rfd_name)   # the report's sentences

A tokenizer run (one cell, one `tokenizer_seed`) has one value of each reconstruction metric, repeated
on every generator row trained on it; so the unit here is the tokenizer seed, never the generator run
(counting the generator rows would pretend 9 samples where a 3 x 3 study has 3). Two cells are paired
by tokenizer seed when they share at least two seeds (a seed fixes the initialization and the data order
of both: docs/methods.md §9), else compared with Welch's interval over their seeds; the verdict is
stats.verdict, as for the generation metrics (a winner only when the 95% interval excludes 0).
The CRT paper's "slightly worse rFD" and VA-VAE's reconstruction claims are answered here.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Mapping, Sequence

from twostage.study.frontier import finite
from twostage.study.stats import Difference, Interval, mean_interval, paired_difference, verdict, welch_difference

__all__ = ["RECON_METRICS", "TokenizerComparison", "tokenizer_values", "tokenizer_comparisons",
           "reconstruction_lines"]

# column -> (lower is better, how the report names it; None: the rFD's own name, e.g. rFD-EffNetLite0)
RECON_METRICS: dict[str, tuple[bool, str | None]] = {
    "rfd": (True, None), "psnr": (False, "PSNR"), "ssim": (False, "SSIM"), "codebook_usage": (False, "codebook usage"),
}


@dataclass(frozen=True)
class TokenizerComparison:
    metric: str
    a: str  # tokenizer cell with the better mean
    b: str
    interval_a: Interval  # over a's tokenizer seeds
    interval_b: Interval
    diff: Difference  # a - b
    pairing: str  # "paired tokenizer seeds" | "unpaired (no shared seeds): Welch" | "1 seed"
    verdict: str
    label_a: str
    label_b: str

    @property
    def winner(self) -> str | None:
        return self.verdict.removesuffix(" better") if self.verdict.endswith(" better") else None

    def to_dict(self) -> dict[str, Any]:
        d = self.diff
        return {"metric": self.metric, "a": self.a, "b": self.b, "label_a": self.label_a, "label_b": self.label_b,
                "winner": self.winner, "mean_a": self.interval_a.mean,
                "mean_b": self.interval_b.mean, "seeds_a": self.interval_a.n, "seeds_b": self.interval_b.n,
                "difference": {"mean": d.mean, "low": d.low, "high": d.high, "dof": d.dof, "method": d.method},
                "pairing": self.pairing, "verdict": self.verdict}


def tokenizer_values(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """{tokenizer cell: {tokenizer seed: value}} of one reconstruction metric (one value per tokenizer run)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        v = r.get(metric)
        if finite(v):
            out.setdefault(r["tokenizer_cell"], {})[int(r["tokenizer_seed"])] = float(v)
    return out


def _compare(metric: str, a: str, b: str, values: Mapping[str, Mapping[int, float]],
             labels: Mapping[str, str]) -> TokenizerComparison:
    lower = RECON_METRICS[metric][0]
    ia, ib = mean_interval(list(values[a].values())), mean_interval(list(values[b].values()))
    if (ia.mean > ib.mean) == lower and ia.mean != ib.mean:
        a, b, ia, ib = b, a, ib, ia
    shared = sorted(set(values[a]) & set(values[b]))
    if len(shared) > 1:
        diff = paired_difference([values[a][s] for s in shared], [values[b][s] for s in shared])
        how = "paired tokenizer seeds"
    elif len(values[a]) > 1 and len(values[b]) > 1:
        diff, how = welch_difference(list(values[a].values()), list(values[b].values())), \
            "unpaired (no shared seeds): Welch"
    else:
        diff, how = paired_difference([ia.mean], [ib.mean]), "1 seed"
    return TokenizerComparison(metric, a, b, ia, ib, diff, how, verdict(diff, lower, (labels[a], labels[b])),
                               labels[a], labels[b])


def tokenizer_comparisons(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str]) -> list[TokenizerComparison]:
    """Every pair of tokenizer cells on every reconstruction metric that both have (cells in label order)."""
    out = []
    runs: dict[str, set] = {}
    for r in rows:
        runs.setdefault(r["tokenizer_cell"], set()).add(r.get("tokenizer_id") or ("cell", r["tokenizer_cell"]))
    for metric in RECON_METRICS:
        values = tokenizer_values(rows, metric)
        if metric == "codebook_usage":  # continuous tokenizers have none; a VQ pair still compares
            values = {k: v for k, v in values.items() if v}
        cells, seen = [], set()
        for c in sorted(values, key=lambda c: (labels.get(c, c), c)):
            # cells that differ only in their generator (a spec's generator_overrides) share their tokenizer
            # runs: compared once, under the first label
            if frozenset(runs[c]) not in seen:
                seen.add(frozenset(runs[c]))
                cells.append(c)
        out += [_compare(metric, a, b, values, labels) for a, b in combinations(cells, 2)]
    return out


def _n(x: float) -> str:
    return f"{x:.3g}".replace("-", "−")


def reconstruction_lines(comparisons: Sequence[TokenizerComparison], labels: Mapping[str, str],
                         rfd_name: str = "rFD") -> list[str]:
    """One sentence per compared pair and metric, with both means, the difference a - b and its interval."""
    lines = []
    for c in comparisons:
        name = RECON_METRICS[c.metric][1] or rfd_name
        la, lb = labels.get(c.a, c.a), labels.get(c.b, c.b)
        means = f"{_n(c.interval_a.mean)} vs {_n(c.interval_b.mean)}"
        if not c.diff.resolved:
            lines.append(f"{name}: {la} {means} ({lb}): {c.verdict} ({c.pairing}).")
            continue
        evidence = f"difference {_n(c.diff.mean)} [{_n(c.diff.low)}, {_n(c.diff.high)}]"
        if c.verdict.endswith(" better"):
            word = "lower" if RECON_METRICS[c.metric][0] else "higher"
            lines.append(f"{name}: {la} has {word} {name} than {lb}: {means}, {evidence} over {c.diff.n_a} "
                         f"{c.pairing if c.diff.method == 'paired t' else 'seeds (Welch)'}.")
        else:
            lines.append(f"{name}: {la} vs {lb}: {means}, {evidence}: {c.verdict} ({c.pairing}).")
    return lines or ["one tokenizer cell: nothing to compare"]
