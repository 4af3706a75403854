"""Compute laws fitted to cell means, with intervals from a bootstrap over whole seeds (docs/methods.md §9).

    sf = fit_series(cells, labels, key, n_boot=1000, seed=0, fit_points="frontier")
    sf["fits"][tokenizer_cell]        FitResult of (5.4) on the cell means (its residual-bootstrap CIs)
    sf["seed_ci"][tokenizer_cell]     alpha / lambda / l_min: percentile intervals over seed resamples
    sf["crossovers"]                  each crossover of the fitted optimum with its seed interval

fit.py's intervals resample the residuals of one curve: they say how tightly the points pin the law.
Here the unit resampled is a seed's whole sweep (the top varying level: a tokenizer seed with all its
generator runs, else a generator seed), with replacement, and the law is refitted to the resampled
cell means (twostage/study/stats.py bootstrap_over_runs), so the interval says how far the law and a
crossover would move with other seeds. When every tokenizer has the same seeds, one draw of seeds is
used for all of them (the pairing by seed carries over to the crossover). A crossover is *resolved*
when its interval lies inside the compute range where both tokenizers were measured and at most 5%
of the resamples lose it; otherwise it is reported as not resolved. Caveat: with fewer than about
ten seeds, percentile intervals are too narrow (and n seeds give only C(2n-1, n) distinct resamples).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from twostage.study.fit import PARAMS, FitResult, fit_law
from twostage.study.frontier import best_per_budget, lower_envelope, optimal_from_fits
from twostage.study.replicates import CellStat
from twostage.study.stats import bootstrap_over_runs

__all__ = ["fit_series", "cell_rows", "MAX_LOST"]

MAX_LOST = 0.05  # a crossover missing from more resamples than this is not resolved
_WIDEN = 10.0  # resampled crossovers are searched this factor beyond the measured range


def cell_rows(cells: Sequence[CellStat], means: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Cells as frontier.py rows: tokenizer_id = tokenizer cell, run_id = generator cell, value = mean."""
    return [{"run_id": c.key, "tokenizer_id": c.tokenizer_cell, "generator_size": c.generator_size,
             "generator_label": f"{c.generator_kind} {c.generator_size} {c.train_steps} steps", "compute": c.compute,
             "value": c.mean if means is None else means.get(c.key, math.nan)} for c in cells]


def _points(rows: list[dict[str, Any]], fit_points: str) -> list[dict[str, Any]]:
    return lower_envelope(rows, "value") if fit_points == "frontier" else \
        [r for r in rows if math.isfinite(r["value"]) and math.isfinite(r["compute"])]


def _fit(rows, fit_points: str, key: dict[str, Any], n_boot: int, seed: int) -> tuple[FitResult, int]:
    pts = _points(rows, fit_points)
    f = fit_law([p["compute"] for p in pts], [p["value"] for p in pts], key=key, n_boot=n_boot, seed=seed)
    return f, len(pts)


def _design(cells: Sequence[CellStat]) -> tuple[str | None, dict[str, dict[Any, dict[str, float]]]]:
    """The resampled level and, per tokenizer cell, unit -> generator cell -> the unit's mean there."""
    level = "tokenizer seed" if any(len({t for t, _ in c.runs}) > 1 for c in cells) else \
        "generator seed" if any(len({g for _, g in c.runs}) > 1 for c in cells) else None
    units: dict[str, dict[Any, dict[str, list[float]]]] = {}
    for c in cells:
        for (t, g), v in c.runs.items():
            u = t if level == "tokenizer seed" else g
            units.setdefault(c.tokenizer_cell, {}).setdefault(u, {}).setdefault(c.key, []).append(v)
    means = {tc: {u: {k: float(np.mean(v)) for k, v in cs.items()} for u, cs in us.items()} for tc, us in units.items()}
    return level, means


def fit_series(cells: Sequence[CellStat], labels: Mapping[str, str], key: dict[str, Any], *, n_boot: int = 1000,
               seed: int = 0, fit_points: str = "frontier") -> dict[str, Any]:
    """Laws per tokenizer cell on the cell means, the fitted optimum, and the seed bootstrap."""
    rows = cell_rows(cells)
    by_tok: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_tok.setdefault(r["tokenizer_id"], []).append(r)
    fits = {}
    for tc, rs in sorted(by_tok.items()):
        fits[tc], used = _fit(rs, fit_points, {**key, "tokenizer_cell": tc, "tokenizer_label": labels[tc]},
                              n_boot, seed)
        if fits[tc].status == "insufficient" and used < len(rs):
            fits[tc].message += (f"; on the lower envelope only {used} of {len(rs)} cells beat all their "
                                 "cheaper cells (--fit-points all fits every cell)")
    optimal = optimal_from_fits(fits)
    level, units = _design(cells)
    out = {"fits": fits, "optimal": optimal, "envelope": lower_envelope(rows, "value"),
           "budgets": best_per_budget(rows, "value"), "level": level, "seed_ci": {}, "crossovers": [],
           "n_units": {tc: len(us) for tc, us in sorted(units.items())}}
    ranges = {tc: (min(r["compute"] for r in rs), max(r["compute"] for r in rs)) for tc, rs in by_tok.items()}
    crossings = [dict(x, measured=[max(ranges[x["from"]][0], ranges[x["to"]][0]),
                                   min(ranges[x["from"]][1], ranges[x["to"]][1])]) for x in optimal["crossovers"]]
    out["crossovers"] = crossings
    seeds = level is not None and any(len(us) > 1 for us in units.values())
    resampled = seeds and n_boot > 0
    for x in crossings:
        x.update({"low": None, "high": None, "lost": None, "resolved": False,
                  "status": "no seed-level interval (--bootstrap 0)" if seeds else "1 seed: no interval"})
    if not resampled:
        return out

    toks = sorted(units)
    unit_keys = {tc: sorted(units[tc]) for tc in toks}
    paired = len({tuple(v) for v in unit_keys.values()}) == 1
    groups = {"seeds": unit_keys[toks[0]]} if paired else unit_keys
    cache: dict[tuple, FitResult] = {}

    def refit(tc: str, drawn: list) -> FitResult:
        k = (tc, tuple(sorted(drawn)))
        if k not in cache:
            sums: dict[str, list[float]] = {}
            for u in drawn:
                for cell, v in units[tc][u].items():
                    sums.setdefault(cell, []).append(v)
            means = {cell: float(np.mean(v)) for cell, v in sums.items()}
            cache[k] = _fit([dict(r, value=means.get(r["run_id"], math.nan)) for r in by_tok[tc]], fit_points,
                            {}, 0, seed)[0]
        return cache[k]

    def drawn(sample: dict[Any, list], tc: str) -> list:
        return sample["seeds"] if paired else sample[tc]

    def param(tc: str, p: str):
        def stat(sample):
            f = refit(tc, drawn(sample, tc))
            return f.params[p] if f.ok else None
        return stat

    def crossing(x: dict[str, Any]):
        a, b = x["from"], x["to"]
        lo, hi = min(ranges[a][0], ranges[b][0]) / _WIDEN, max(ranges[a][1], ranges[b][1]) * _WIDEN

        def stat(sample):
            fa, fb = refit(a, drawn(sample, a)), refit(b, drawn(sample, b))
            if not (fa.ok and fb.ok):
                return None
            found = optimal_from_fits({a: fa, b: fb}, c_range=(lo, hi), points=200)["crossovers"]
            if not found:
                return None
            return min((math.log(c["compute"]) for c in found), key=lambda v: abs(v - math.log(x["compute"])))
        return stat

    boot = dict(num_resamples=n_boot, seed=seed)
    for tc in toks:
        if tc in fits and fits[tc].ok and len(units[tc]) > 1:
            res = {p: bootstrap_over_runs(groups, param(tc, p), **boot) for p in PARAMS}
            out["seed_ci"][tc] = {p: [r.low, r.high] for p, r in res.items()} | {
                "lost": res["alpha"].failed_fraction, "units": len(units[tc])}
    for x in crossings:
        r = bootstrap_over_runs(groups, crossing(x), **boot)
        low, high = (math.exp(r.low), math.exp(r.high)) if r.values.size else (math.nan, math.nan)
        inside = math.isfinite(low) and x["measured"][0] <= low and high <= x["measured"][1]
        x.update({"low": low, "high": high, "lost": r.failed_fraction,
                  "resolved": bool(inside and r.failed_fraction <= MAX_LOST)})
        if x["resolved"]:
            x["status"] = "resolved"
        elif r.failed_fraction > MAX_LOST:
            x["status"] = f"not resolved: {100 * r.failed_fraction:.0f}% of seed resamples have no crossover"
        else:
            x["status"] = "not resolved: its interval leaves the compute range where both were measured"
    out["resample"] = {"level": level, "paired": paired, "resamples": n_boot, "seed": seed,
                       "distinct_fits": len(cache)}
    return out
