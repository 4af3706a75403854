"""Compute-optimal frontiers over the study's runs and over the fitted laws.

Rows are dicts with the results-table columns (twostage/study/__init__.py). Three views:
- the empirical lower envelope: for a budget B, the best run whose compute is at most B
  (`best_per_budget`), and the runs that set a new best as compute grows (`lower_envelope`);
- the fitted view: on a log-spaced grid of C, the tokenizer whose fitted law is lowest, the
  segments where one tokenizer stays optimal, and the crossover computes where the optimum changes
  (`optimal_from_fits`), each crossover solved exactly between grid points;
- the rFD-vs-gFD frontier: each tokenizer's reconstruction quality against the best generation
  quality any of its runs reached, and the Pareto set of tokenizers (`pareto_rfd_gfd`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import optimize

from twostage.study.fit import FitResult

__all__ = ["finite", "compute_levels", "lower_envelope", "best_per_budget", "optimal_from_fits",
           "pareto_rfd_gfd", "tokenizer_labels"]

Row = Mapping[str, Any]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tokenizer_labels(rows: Iterable[Row]) -> dict[str, str]:
    """tokenizer_id -> display label; two ids that share a label get their id's first characters
    appended, so the report never merges two tokenizers under one name."""
    by_id: dict[str, str] = {}
    for r in rows:
        by_id.setdefault(r["tokenizer_id"], r.get("tokenizer_label") or r["tokenizer_id"])
    counts: dict[str, int] = {}
    for label in by_id.values():
        counts[label] = counts.get(label, 0) + 1
    return {tid: (f"{label} [{tid[:8]}]" if counts[label] > 1 else label) for tid, label in sorted(by_id.items())}


def _valid(rows: Iterable[Row], metric: str) -> list[Row]:
    return [r for r in rows if finite(r.get("compute")) and r["compute"] > 0 and finite(r.get(metric))]


def _brief(r: Row, metric: str) -> dict[str, Any]:
    return {"run_id": r["run_id"], "tokenizer_id": r["tokenizer_id"], "generator_size": r.get("generator_size"),
            "generator_label": r.get("generator_label"), "compute": float(r["compute"]), "value": float(r[metric])}


def compute_levels(computes: Iterable[float], rel_tol: float = 0.05) -> list[float]:
    """Distinct budgets: sorted computes, values within rel_tol of a level's smallest member join it
    (runs of different sizes at one nominal budget rarely have bit-equal FLOP counts). Each level is
    represented by its largest member, so every run of the level fits within the budget."""
    levels: list[list[float]] = []
    for c in sorted(float(c) for c in computes):
        if levels and c <= levels[-1][0] * (1 + rel_tol):
            levels[-1].append(c)
        else:
            levels.append([c])
    return [max(group) for group in levels]


def lower_envelope(rows: Iterable[Row], metric: str) -> list[dict[str, Any]]:
    """Runs that are strictly better in `metric` than every run of no more compute, in compute order."""
    ordered = sorted(_valid(rows, metric), key=lambda r: (r["compute"], r[metric], r["run_id"]))
    out, best = [], math.inf
    for r in ordered:
        if r[metric] < best:
            best = r[metric]
            out.append(_brief(r, metric))
    return out


def best_per_budget(rows: Iterable[Row], metric: str, budgets: Iterable[float] | None = None,
                    rel_tol: float = 0.05) -> list[dict[str, Any]]:
    """For each budget B (default: the table's compute levels), the best run with compute <= B and
    the best run at that level itself (compute within rel_tol below B)."""
    rows = _valid(rows, metric)
    if budgets is None:
        budgets = compute_levels((r["compute"] for r in rows), rel_tol)
    out = []
    for b in budgets:
        within = [r for r in rows if r["compute"] <= b * (1 + 1e-9)]
        at = [r for r in within if r["compute"] >= b / (1 + rel_tol)]
        pick = lambda rs: _brief(min(rs, key=lambda r: (r[metric], r["compute"], r["run_id"])), metric) if rs else None
        out.append({"budget": float(b), "best_within": pick(within), "best_at_level": pick(at)})
    return out


def optimal_from_fits(fits: Mapping[str, FitResult], c_range: tuple[float, float] | None = None,
                      points: int = 400) -> dict[str, Any]:
    """Which key's fitted law is lowest at each compute of a log-spaced grid over c_range (default:
    the union of the fitted points' ranges). Returns the grid and winners, the segments
    [{c_lo, c_hi, key, extrapolated}] (extrapolated: the segment leaves the winner's own fitted
    compute range; a span is split where that range begins or ends), the crossovers
    [{compute, from, to, value}], and the keys with and without a fitted law ("fitted", "unfitted").
    Fewer than two fitted laws compare nothing: no segments then (one law is not "optimal")."""
    ok = {k: f for k, f in sorted(fits.items()) if f.ok}
    who = {"fitted": list(ok), "unfitted": sorted(k for k, f in fits.items() if not f.ok)}
    if len(ok) < 2:
        return {"grid": [], "winner": [], "segments": [], "crossovers": [], **who}
    if c_range is None:
        c_range = (min(f.compute_range[0] for f in ok.values()), max(f.compute_range[1] for f in ok.values()))
    lo, hi = (float(v) for v in c_range)
    grid = np.geomspace(lo, hi, points) if hi > lo else np.array([lo])
    keys = list(ok)
    preds = np.stack([ok[k].predict(grid) for k in keys])
    win = np.argmin(preds, axis=0)

    crossovers = []
    for i in np.flatnonzero(win[1:] != win[:-1]):
        a, b = keys[win[i]], keys[win[i + 1]]
        diff = lambda logc: float(ok[a].predict(math.exp(logc)) - ok[b].predict(math.exp(logc)))
        logc = optimize.brentq(diff, math.log(grid[i]), math.log(grid[i + 1]), xtol=1e-12)
        c = math.exp(logc)
        crossovers.append({"compute": c, "from": a, "to": b, "value": float(ok[a].predict(c))})

    edges = [lo, *(x["compute"] for x in crossovers), hi]
    owners = [keys[win[0]], *(x["to"] for x in crossovers)]
    segments = []
    for k, c_lo, c_hi in zip(owners, edges[:-1], edges[1:]):
        # Split where the winner's own runs begin or end, so the part that rests on extrapolating
        # its law is a segment of its own rather than a caveat on the whole span.
        r_lo, r_hi = ok[k].compute_range
        cuts = [c_lo, *(r for r in (r_lo, r_hi) if c_lo < r < c_hi), c_hi]
        for a, b in zip(cuts[:-1], cuts[1:]):
            extrapolated = a < r_lo * (1 - 1e-9) or b > r_hi * (1 + 1e-9)
            segments.append({"c_lo": float(a), "c_hi": float(b), "key": k, "extrapolated": bool(extrapolated)})
    return {"grid": grid.tolist(), "winner": [keys[w] for w in win], "segments": segments, "crossovers": crossovers,
            **who}


def pareto_rfd_gfd(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Per tokenizer: its rFD (median over its rows: every row repeats the tokenizer's value), the best
    gFD of its runs and which run; `pareto` marks tokenizers no other tokenizer beats in both (lower
    or equal in both and lower in one). Tokenizers without an rFD or without a gFD are listed with
    pareto False. Sorted by rFD."""
    by_tok: dict[str, list[Row]] = {}
    for r in rows:
        by_tok.setdefault(r["tokenizer_id"], []).append(r)
    out = []
    for tid, rs in sorted(by_tok.items()):
        rfds = [r["rfd"] for r in rs if finite(r.get("rfd"))]
        gen = [r for r in rs if finite(r.get("gfd"))]
        best = min(gen, key=lambda r: (r["gfd"], r["compute"] if finite(r.get("compute")) else 0, r["run_id"])) if gen else None
        out.append({"tokenizer_id": tid, "rfd": float(np.median(rfds)) if rfds else None,
                    "best_gfd": float(best["gfd"]) if best else None, "best_run_id": best["run_id"] if best else None,
                    "pareto": False})
    both = [t for t in out if t["rfd"] is not None and t["best_gfd"] is not None]
    for t in both:
        t["pareto"] = not any(
            o is not t and o["rfd"] <= t["rfd"] and o["best_gfd"] <= t["best_gfd"]
            and (o["rfd"] < t["rfd"] or o["best_gfd"] < t["best_gfd"]) for o in both)
    return sorted(out, key=lambda t: (t["rfd"] is None, t["rfd"] if t["rfd"] is not None else 0, t["tokenizer_id"]))
