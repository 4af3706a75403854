"""Verdicts: at one generator (kind, size, budget), is tokenizer A better than B, with how many seeds?

    comparisons = compare_cells(cells, metric, labels)    # every pair of tokenizer cells per budget
    headline(comparisons)                                  # the best cell vs each other, per budget
    comparison_line(c, name)                               # "At budget 2000 steps (ar small): ..."

A pair is compared on runs that share their seeds: the difference a - b is taken per tokenizer seed
(each averaged over the generator seeds both cells share) when several tokenizer seeds are shared,
else per generator seed; a seed moves both tokenizers alike through the data order and the sampling
noise, so pairing removes it (twostage/study/stats.py paired_difference). Without shared seeds the
cells' own seed means go through Welch's interval. The verdict is stats.verdict: a winner only when
the 95% interval of the difference excludes 0, never from one seed. Two cells are not compared
when their evaluation protocols differ (another sample count or network is another metric) or, for
a validation loss, when their tokenizers pose another prediction task (tokens per image, codebook).

Equal steps are not equal compute when the tokenizers differ in tokens per image (a step of an AR
model over 256 tokens costs 16x one over 16), and a compute-efficiency claim (docs/methods.md §5) is
about equal compute. `compare_at_matched_compute` therefore also pairs cells of two tokenizers whose
training compute C is within a factor (1.35 by default) at other sizes or budgets, with the ratio
stated, so a reader sees whether the winner also had the smaller budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Mapping, Sequence

import numpy as np

from twostage.study.replicates import METRICS, CellStat
from twostage.study.stats import Difference, paired_difference, verdict, welch_difference

__all__ = ["Comparison", "compare", "compare_cells", "compare_at_matched_compute", "headline", "comparison_line",
           "budget_line", "budget_text", "matched_line", "MATCHED_COMPUTE_RATIO"]

MATCHED_COMPUTE_RATIO = 1.35  # cells whose compute differs by at most this factor count as one budget


@dataclass
class Comparison:
    metric: str
    group: tuple[str, str, Any]  # (generator kind, size, train steps); (kind, MATCHED, None) at matched compute
    a: CellStat  # the one with the better mean
    b: CellStat
    label_a: str
    label_b: str
    diff: Difference | None  # a - b; None when not compared
    pairing: str  # how the seeds were matched, or why the cells were not compared
    verdict: str  # "<label> better" | "not distinguishable with N seeds" | "not compared"

    @property
    def winner(self) -> str | None:
        return self.verdict.removesuffix(" better") if self.verdict.endswith(" better") else None

    @property
    def compared(self) -> bool:
        return self.diff is not None

    def to_dict(self) -> dict[str, Any]:
        d = self.diff
        return {"metric": self.metric, "generator_kind": self.group[0], "generator_size": self.group[1],
                "train_steps": self.group[2], "a": self.a.tokenizer_cell, "b": self.b.tokenizer_cell,
                "label_a": self.label_a, "label_b": self.label_b, "mean_a": self.a.mean, "mean_b": self.b.mean,
                "generator_cell_a": self.a.key, "generator_cell_b": self.b.key, "pairing": self.pairing,
                "size_a": self.a.generator_size, "size_b": self.b.generator_size, "steps_a": self.a.train_steps,
                "steps_b": self.b.train_steps, "compute_a": self.a.compute, "compute_b": self.b.compute,
                "verdict": self.verdict, "winner": self.winner,
                "difference": None if d is None else {"mean": d.mean, "low": d.low, "high": d.high, "n_a": d.n_a,
                                                      "n_b": d.n_b, "dof": d.dof, "method": d.method}}


def _paired(a: CellStat, b: CellStat) -> tuple[list[float], list[float], str] | None:
    """Values of a and b on their shared seeds at the top shared level, or None with < 2 units."""
    shared = sorted(set(a.runs) & set(b.runs))
    toks = sorted({t for t, _ in shared})
    gens = sorted({g for _, g in shared})
    if len(toks) > 1:  # each tokenizer seed: the mean over the generator seeds both cells have for it
        pick = lambda cell, u: float(np.mean([cell.runs[k] for k in shared if k[0] == u]))
        return [pick(a, u) for u in toks], [pick(b, u) for u in toks], "paired tokenizer seeds"
    if len(gens) > 1:
        return [a.runs[(toks[0], g)] for g in gens], [b.runs[(toks[0], g)] for g in gens], "paired generator seeds"
    return None


def _units(cell: CellStat) -> list[float]:
    """A cell's seed-level values (what its interval is over)."""
    if cell.level == "tokenizer seed":
        toks = sorted({t for t, _ in cell.runs})
        return [float(np.mean([v for (t, _), v in cell.runs.items() if t == u])) for u in toks]
    return [cell.runs[k] for k in sorted(cell.runs)]


def _difference(a: CellStat, b: CellStat) -> tuple[Difference, str]:
    paired = _paired(a, b)
    if paired is not None:
        va, vb, how = paired
        return paired_difference(va, vb), how
    ua, ub = _units(a), _units(b)
    if len(ua) > 1 and len(ub) > 1:
        return welch_difference(ua, ub), "unpaired (no shared seeds): Welch"
    return paired_difference([a.mean], [b.mean]), "1 seed"  # one seed: no interval, no claim


def compare(a: CellStat, b: CellStat, metric: str, labels: Mapping[str, str],
            group: tuple[str, str, Any]) -> Comparison:
    """a vs b, ordered so that a is the better one on the evidence compared (the mean difference over
    the shared seeds, or the cell means when not compared)."""
    lower = METRICS[metric].lower_is_better
    if (a.mean > b.mean) == lower and a.mean != b.mean:
        a, b = b, a  # a: the better mean
    reason = None
    if a.protocol != b.protocol:
        reason = "not compared: their evaluation protocols differ"
    elif not METRICS[metric].eval_dependent and a.task != b.task:
        reason = "not compared: different prediction tasks (tokens per image, codebook or latent channels)"
    if reason:
        return Comparison(metric, group, a, b, labels[a.tokenizer_cell], labels[b.tokenizer_cell], None, reason,
                          "not compared")
    diff, how = _difference(a, b)
    if (diff.mean > 0) == lower and diff.mean != 0:  # the shared seeds favour b (some of a's seeds unpaired)
        a, b = b, a
        diff, how = _difference(a, b)
    la, lb = labels[a.tokenizer_cell], labels[b.tokenizer_cell]
    return Comparison(metric, group, a, b, la, lb, diff, how, verdict(diff, lower, (la, lb)))


def _group(c: CellStat) -> tuple[str, str, Any]:
    return (c.generator_kind, c.generator_size, c.train_steps)


def compare_cells(cells: Sequence[CellStat], metric: str, labels: Mapping[str, str]) -> list[Comparison]:
    """Every pair of tokenizer cells at each (generator kind, size, budget), in budget order."""
    groups: dict[tuple, list[CellStat]] = {}
    size_c: dict[tuple[str, str], float] = {}  # sizes in order of compute (a larger model costs more per step)
    for c in cells:
        groups.setdefault(_group(c), []).append(c)
        size_c[c.generator_kind, c.generator_size] = min(size_c.get((c.generator_kind, c.generator_size), math.inf),
                                                         c.compute if math.isfinite(c.compute) else math.inf)
    order = lambda g: (str(g[0]), size_c[g[0], g[1]], str(g[1]), g[2] if isinstance(g[2], (int, float)) else math.inf)
    out = []
    for g in sorted(groups, key=order):
        mine = sorted(groups[g], key=lambda c: (labels[c.tokenizer_cell], c.key))
        out += [compare(x, y, metric, labels, g) for x, y in combinations(mine, 2)]
    return out


MATCHED = "matched compute"


def compare_at_matched_compute(cells: Sequence[CellStat], metric: str, labels: Mapping[str, str],
                               ratio: float = MATCHED_COMPUTE_RATIO) -> list[Comparison]:
    """Pairs of cells of two tokenizers at other (size, budget) points whose compute is within `ratio`:
    for each cell, the other tokenizer's cell of the same generator kind nearest in compute, once per
    pair. Pairs at one (size, budget) are compare_cells' business; pairs not comparable (protocols,
    prediction tasks) are left out, and so are two tokenizers whose steps cost the same (compute within
    5% at a shared size and budget): for them equal steps already are equal compute."""
    out, seen = [], set()
    finite = [c for c in cells if math.isfinite(c.compute) and c.compute > 0]
    at: dict[tuple, dict[str, float]] = {}
    for c in finite:
        at.setdefault(_group(c), {})[c.tokenizer_cell] = c.compute
    same_cost = {frozenset((a, b)) for g in at.values() for a, b in combinations(g, 2)
                 if max(g[a], g[b]) <= 1.05 * min(g[a], g[b])}
    for c in sorted(finite, key=lambda c: (c.compute, c.key)):
        others: dict[str, CellStat] = {}
        for o in finite:
            if o.tokenizer_cell == c.tokenizer_cell or o.generator_kind != c.generator_kind or _group(o) == _group(c) \
                    or frozenset((o.tokenizer_cell, c.tokenizer_cell)) in same_cost:
                continue
            near = others.get(o.tokenizer_cell)
            if near is None or abs(math.log(o.compute / c.compute)) < abs(math.log(near.compute / c.compute)):
                others[o.tokenizer_cell] = o
        for o in others.values():
            pair = frozenset((c.key, o.key))
            if max(c.compute, o.compute) > ratio * min(c.compute, o.compute) or pair in seen:
                continue
            seen.add(pair)
            comparison = compare(c, o, metric, labels, (c.generator_kind, MATCHED, None))
            if comparison.compared:
                out.append(comparison)
    return sorted(out, key=lambda x: (min(x.a.compute, x.b.compute), x.label_a, x.label_b))


def matched_line(c: Comparison, name: str) -> str:
    """"C ≈ 1e+14: vq f4 (ar mini 800 steps, 0.78x the compute) has lower gFD than vq f8 (ar small 800
    steps): −3.5 [−5.1, −1.9] over 3 paired tokenizer seeds"."""
    where = lambda x: f"{x.generator_kind} {x.generator_size} {x.train_steps} steps"
    share = c.a.compute / c.b.compute
    ratio = f", {share:.2f}x the compute" if abs(share - 1) > 0.05 else ""
    head = f"C ≈ {math.sqrt(c.a.compute * c.b.compute):.2e}: {c.label_a} ({where(c.a)}{ratio})"
    if not c.diff.resolved:
        return f"{head} vs {c.label_b} ({where(c.b)}) on {name}: {_num(c.diff.mean)} (no interval): 1 seed, no winner."
    if c.winner:
        return f"{head} has {_better_word(c)} {name} than {c.label_b} ({where(c.b)}): {_evidence(c.diff)} over {_seeds(c)}."
    return (f"{head} vs {c.label_b} ({where(c.b)}) on {name}: difference {_evidence(c.diff)}, {c.verdict} "
            f"({c.pairing}).")


def _comparable(c: CellStat, metric: str) -> tuple:
    return (c.protocol, None if METRICS[metric].eval_dependent else c.task)


def headline(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Per budget and per set of mutually comparable cells (one protocol; for a validation loss one
    prediction task), the cell with the best mean against each other cell: the questions a reader asks
    first. Between two such sets, one pair (their best cells) says why they were not compared. The
    remaining pairs stay in the full table."""
    by_group: dict[tuple, list[Comparison]] = {}
    for c in comparisons:
        by_group.setdefault(c.group, []).append(c)
    out = []
    for g, cs in by_group.items():
        metric = cs[0].metric
        pick = min if METRICS[metric].lower_is_better else max
        cells = {c.a.key: c.a for c in cs} | {c.b.key: c.b for c in cs}
        sets: dict[tuple, list[CellStat]] = {}
        for cell in cells.values():
            sets.setdefault(_comparable(cell, metric), []).append(cell)
        best = {k: pick(v, key=lambda c: c.mean).key for k, v in sets.items()}
        tops = set(best.values())
        for c in cs:
            same = _comparable(c.a, metric) == _comparable(c.b, metric)
            if (same and best[_comparable(c.a, metric)] in (c.a.key, c.b.key)) or \
                    (not same and c.a.key in tops and c.b.key in tops):
                out.append(c)
    return out


def budget_text(group: tuple[str, str, Any], computes: Sequence[float] = ()) -> str:
    """"At budget 2000 steps (ar small, C ≈ 1.2e+14)", with the range of C when the tokenizers' runs
    differ in compute at these steps (fewer tokens per image cost less per step)."""
    kind, size, steps = group
    cs = sorted(c for c in computes if math.isfinite(c))
    c = "" if not cs else f", C ≈ {cs[0]:.2e}" if cs[-1] <= cs[0] * 1.05 else f", C {cs[0]:.2e}–{cs[-1]:.2e}"
    return f"At budget {steps} steps ({kind} {size}{c})"


def _num(x: float) -> str:
    return f"{x:.3g}".replace("-", "−")


def _evidence(d: Difference) -> str:
    return f"{_num(d.mean)} [{_num(d.low)}, {_num(d.high)}]" if d.resolved else f"{_num(d.mean)} (no interval)"


def _seeds(c: Comparison) -> str:
    d = c.diff
    if d.method == "paired t":
        return f"{d.n_a} {c.pairing}"
    return f"{d.n_a} and {d.n_b} unpaired seeds (Welch)"


def _better_word(c: Comparison) -> str:
    return "lower" if METRICS[c.metric].lower_is_better else "higher"


def comparison_line(c: Comparison, name: str) -> str:
    """One sentence with its evidence (difference a - b and its 95% interval)."""
    return budget_line([c], name)


def budget_line(comparisons: Sequence[Comparison], name: str) -> str:
    """One sentence per budget: the tokenizer with the best mean against each other one there, each
    with the difference and its 95% interval ("At budget 2000 steps (ar small, C ≈ 1.2e+14): CRT has
    lower gFD than baseline: −2.3 [−3.1, −1.5] over 3 paired generator seeds". A single seed gives the
    values and no winner; pairs that were not compared say why."""
    cs = list(comparisons)
    where = budget_text(cs[0].group, [x.compute for c in cs for x in (c.a, c.b)])
    one = [c for c in cs if c.compared and not c.diff.resolved and c.diff.method == "paired t" and c.diff.n_a == 1]
    wins = [c for c in cs if c.compared and c.winner and c not in one]
    ties = [c for c in cs if c.compared and not c.winner and c not in one]
    parts = []
    for decided, chosen in ((True, wins), (False, ties)):
        by: dict[tuple[str, str, str], list[Comparison]] = {}  # one clause per (first, verdict, seeds)
        for c in chosen:
            by.setdefault((c.label_a, c.verdict, _seeds(c)), []).append(c)
        for (first, said, seeds), group in by.items():
            if decided:
                items = ", ".join(f"{c.label_b}: {_evidence(c.diff)}" for c in group)
                parts.append(f"{first} has {_better_word(group[0])} {name} than {items} over {seeds}")
            else:
                items = ", ".join(f"{c.label_b} (difference {_evidence(c.diff)})" for c in group)
                parts.append(f"{first} vs {items} on {name}: {said} ({group[0].pairing})")
    sets: dict[tuple, dict[str, tuple[str, float]]] = {}  # one clause per set of comparable cells
    for c in one:
        sets.setdefault(_comparable(c.a, c.metric), {}).update({c.a.key: (c.label_a, c.a.mean),
                                                                c.b.key: (c.label_b, c.b.mean)})
    for cells in sets.values():
        values = ", ".join(f"{label} {v:.4g}" for label, v in sorted(cells.values(), key=lambda x: (x[1], x[0])))
        parts.append(f"{name} {values}: 1 seed: no interval, no winner")
    parts += [f"{c.label_a} vs {c.label_b} on {name}: {c.pairing}" for c in cs if not c.compared]
    return f"{where}: " + "; ".join(parts) + "."
