"""Replicates: the rows of one grid point (cell) that differ only in their seeds, aggregated with their
uncertainty (docs/methods.md §9).

    rows = normalise(rows)                 # old one-seed tables get cells and seeds filled in
    cells = aggregate(rows, "gfd")         # one CellStat per generator cell: mean [95% CI] over seeds,
                                           # the evaluation's own noise, variance components
    series_components(cells)               # which seed moves the metric most, over a series' cells

Levels of replication, nested: a tokenizer seed (its own tokenizer run), a generator seed (a generator
run on that tokenizer), an evaluation seed (a samples file of that run). A cell's interval is over its
*top varying level*: tokenizer seeds when there are several (each averaged over its generator runs
and their evaluations), else generator seeds, else none ("1 seed: no interval") — an interval over
evaluation seeds of one trained model says how well that model was measured, not how the study
would come out again, so it is shown apart, as the evaluation's own uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from twostage.study.frontier import finite
from twostage.study.protocols import comparability_key
from twostage.study.stats import Interval, VarianceComponents, mean_interval, variance_components

__all__ = ["Metric", "METRICS", "GENERATION", "metric_name", "normalise", "CellStat", "aggregate", "ci_text",
           "series_components", "Z95"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile: an interval's half width over it is an sd


@dataclass(frozen=True)
class Metric:
    column: str
    eval_dependent: bool = True  # False: the same value for every evaluation seed of a run (val loss)
    stderr: str | None = None  # column holding the evaluation's own standard error
    interval: tuple[str, str] | None = None  # columns holding the evaluation's own (bootstrap) 95% interval
    lower_is_better: bool = True


METRICS = {"val_loss": Metric("val_loss", eval_dependent=False),
           "gfd": Metric("gfd", interval=("gfd_low", "gfd_high")),
           "gfd_inf": Metric("gfd_inf", stderr="gfd_inf_stderr"),
           "kid": Metric("kid", stderr="kid_stderr"),
           # code_entropy - val_loss (AR, nats/token): the loss's gain over a context-free model, comparable
           # between codebooks used unequally (results/crt_collapse); derived in report.analyze
           "context_gain": Metric("context_gain", eval_dependent=False, lower_is_better=False)}
GENERATION = ("gfd", "gfd_inf", "kid")  # analysed per gfd_name (one feature network, one protocol)


def metric_name(metric: str, gfd_name: str) -> str:
    """Display name of a generation metric under the network of gfd_name, as
    twostage.metrics.protocol.metric_name names it ("FD-EffNetLite0" -> "FDinf-EffNetLite0",
    "KID-EffNetLite0"; "FID" -> "FIDinf", "KID")."""
    if metric == "gfd":
        return gfd_name
    net = gfd_name.split("-", 1)[1] if "-" in gfd_name else ""
    prefix, inception = {"gfd_inf": ("FDinf", "FIDinf"), "kid": ("KID", "KID")}[metric]
    return f"{prefix}-{net}" if net else inception


def normalise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows with the replicate columns filled in for tables written before them: each
    tokenizer_id its own tokenizer cell, each run its own generator cell, seeds 0."""
    out = []
    for r in rows:
        r = dict(r)
        r["tokenizer_cell"] = r.get("tokenizer_cell") or r["tokenizer_id"]
        r["generator_cell"] = r.get("generator_cell") or r["run_id"]
        for s in ("tokenizer_seed", "generator_seed", "eval_seed"):
            r[s] = int(r[s]) if r.get(s) is not None else 0
        out.append(r)
    return out


@dataclass
class CellStat:
    """One metric in one generator cell (tokenizer cell x generator kind, size, budget), over its seeds."""

    key: str  # generator_cell
    tokenizer_cell: str
    generator_kind: str
    generator_size: str
    train_steps: int | None
    compute: float
    interval: Interval  # over the top varying seed level (n == 1: no interval)
    level: str  # what interval.n counts: "tokenizer seed" | "generator seed" | "seed"
    runs: dict[tuple[int, int], float]  # (tokenizer seed, generator seed) -> mean over evaluation seeds
    values: dict[tuple[int, int, int], float]  # (tokenizer, generator, eval seed) -> value
    eval_sd: float | None  # pooled sd over evaluation seeds within a run (None: one per run)
    eval_df: int
    internal_sd: float | None  # the evaluation's own sd (bootstrap interval / stderr), mean over rows
    components: VarianceComponents | None
    protocol: str  # comparability fields of gen_protocol
    task: tuple  # (tokens_per_image, codebook_size, latent_channels): what a val loss predicts
    rows: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def mean(self) -> float:
        return self.interval.mean

    def brief(self) -> dict[str, Any]:
        i = self.interval
        return {"generator_cell": self.key, "tokenizer_cell": self.tokenizer_cell, "generator_kind": self.generator_kind,
                "generator_size": self.generator_size, "train_steps": self.train_steps, "compute": self.compute,
                "mean": i.mean, "low": i.low, "high": i.high, "n": i.n, "std": i.std, "level": self.level,
                "eval_sd": self.eval_sd, "eval_df": self.eval_df, "internal_sd": self.internal_sd,
                "runs": [[t, g, v] for (t, g), v in sorted(self.runs.items())],
                "values": [[t, g, e, v] for (t, g, e), v in sorted(self.values.items())],
                "variance_components": _components_dict(self.components)}


def _components_dict(vc: VarianceComponents | None) -> dict[str, Any] | None:
    if vc is None:
        return None
    return {"dominant": vc.dominant, "n": vc.n, "notes": list(vc.notes),
            "components": [{"source": c.source, "variance": c.variance, "estimate": c.estimate, "df": c.df,
                            "fraction": c.fraction} for c in vc.components]}


def ci_text(i: Interval, digits: int = 4) -> str:
    """"12.3 [11.9, 12.7]" or "12.3 (1 seed: no interval)"."""
    if not i.resolved:
        return f"{i.mean:.{digits}g} (1 seed: no interval)"
    return f"{i.mean:.{digits}g} [{i.low:.{digits}g}, {i.high:.{digits}g}]"


def _internal_sd(rows: list[dict[str, Any]], m: Metric) -> float | None:
    sds = []
    for r in rows:
        if m.stderr and finite(r.get(m.stderr)):
            sds.append(float(r[m.stderr]))
        elif m.interval and finite(r.get(m.interval[0])) and finite(r.get(m.interval[1])):
            sds.append((float(r[m.interval[1]]) - float(r[m.interval[0]])) / (2 * Z95))
    return float(np.mean(sds)) if sds else None


def _cell(rows: list[dict[str, Any]], metric: str) -> CellStat:
    m = METRICS[metric]
    values: dict[tuple[int, int, int], list[float]] = {}
    for r in rows:
        values.setdefault((r["tokenizer_seed"], r["generator_seed"], r["eval_seed"]), []).append(float(r[metric]))
    flat = {k: float(np.mean(v)) for k, v in sorted(values.items())}  # a repeated key (should not happen): its mean
    by_run: dict[tuple[int, int], list[float]] = {}
    for (t, g, _), v in flat.items():
        by_run.setdefault((t, g), []).append(v)
    runs = {k: float(np.mean(v)) for k, v in by_run.items()}
    toks = sorted({t for t, _ in runs})
    gens = sorted({g for _, g in runs})
    if len(toks) > 1:  # each tokenizer seed: the mean of its generator runs
        level = "tokenizer seed"
        units = [float(np.mean([v for (t, _), v in runs.items() if t == u])) for u in toks]
    else:
        level = "generator seed" if len(gens) > 1 else "seed"
        units = [runs[k] for k in sorted(runs)]
    eval_sd, eval_df = None, 0
    if m.eval_dependent and any(len(v) > 1 for v in by_run.values()):
        ss = sum(float(((np.array(v) - np.mean(v)) ** 2).sum()) for v in by_run.values())
        eval_df = sum(len(v) - 1 for v in by_run.values())
        eval_sd = math.sqrt(ss / eval_df)
    components = None
    if m.eval_dependent and len(flat) > 1:
        components = variance_components(flat)
    elif not m.eval_dependent and len(runs) > 1:
        components = variance_components(runs, levels=("tokenizer", "generator"))
    first = rows[0]
    computes = [float(r["compute"]) for r in rows if finite(r.get("compute"))]
    return CellStat(
        key=first["generator_cell"], tokenizer_cell=first["tokenizer_cell"],
        generator_kind=str(first.get("generator_kind")), generator_size=str(first.get("generator_size")),
        train_steps=first.get("train_steps"), compute=float(np.mean(computes)) if computes else math.nan,
        interval=mean_interval(units), level=level, runs=runs, values=flat, eval_sd=eval_sd, eval_df=eval_df,
        internal_sd=_internal_sd(rows, m), components=components,
        protocol=comparability_key(first.get("gen_protocol")) if metric in GENERATION else "",
        task=(first.get("tokens_per_image"), first.get("codebook_size"), first.get("latent_channels")), rows=rows)


def aggregate(rows: Sequence[dict[str, Any]], metric: str) -> list[CellStat]:
    """One CellStat per (generator cell, tokenizer cell) over the normalised rows with a finite
    `metric`, sorted by tokenizer cell, kind, size, compute."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if finite(r.get(metric)):
            groups.setdefault((r["generator_cell"], r["tokenizer_cell"]), []).append(r)
    cells = [_cell(g, metric) for _, g in sorted(groups.items())]
    return sorted(cells, key=lambda c: (c.tokenizer_cell, c.generator_kind, c.generator_size,
                                        c.compute if math.isfinite(c.compute) else 0.0, c.key))


def series_components(cells: Sequence[CellStat]) -> dict[str, Any] | None:
    """Variance components pooled over a series' cells: per source, the mean of its per-cell
    (clipped) estimates and the summed degrees of freedom; the dominant source by that mean, and
    in how many cells each source dominated. None when no cell has replicates."""
    per_source: dict[str, list[tuple[float, int]]] = {}
    dominant: dict[str, int] = {}
    n = 0
    for c in cells:
        if c.components is None or not c.components.components:
            continue
        n += 1
        for comp in c.components.components:
            per_source.setdefault(comp.source, []).append((comp.variance, comp.df))
        if c.components.dominant:
            dominant[c.components.dominant] = dominant.get(c.components.dominant, 0) + 1
    if not per_source:
        return None
    sources = {s: {"variance": float(np.mean([v for v, _ in vs])), "df": int(sum(d for _, d in vs)),
                   "cells": len(vs), "min_df": int(min(d for _, d in vs))} for s, vs in sorted(per_source.items())}
    total = sum(s["variance"] for s in sources.values())
    for s in sources.values():
        s["fraction"] = s["variance"] / total if total > 0 else math.nan
    top = max(sources, key=lambda s: sources[s]["variance"]) if total > 0 else None
    return {"sources": sources, "dominant": top, "cells": n, "dominant_in_cells": dict(sorted(dominant.items()))}
