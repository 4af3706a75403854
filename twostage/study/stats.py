"""Statistics over replicate runs (seeds), so that a study's verdict carries its uncertainty.

    mean_interval(values)                  mean of one cell over seeds, Student-t interval
    paired_difference(a, b) / welch_difference(a, b), then verdict(diff)
                                           "A better" | "B better" | "not distinguishable with 3 seeds"
    bootstrap_over_runs(groups, statistic) percentile interval of anything computed from whole runs
    variance_components(table)             which seed (tokenizer, generator, eval) moves a cell most

Every interval is two-sided at `confidence`. A single run has no interval: its bounds are NaN and
the result says so (`resolved` is False), rather than printing a bare number that looks certain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np
from scipy import stats

__all__ = ["Interval", "mean_interval", "Difference", "paired_difference", "welch_difference", "verdict",
           "RunBootstrap", "bootstrap_over_runs", "Component", "VarianceComponents", "variance_components"]

NAN = float("nan")
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def _values(values: Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"{what}: need one or more finite values, got {list(v)}")
    return v


def _t_half(se: float, dof: float, confidence: float) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, dof)) * se


@dataclass(frozen=True)
class Interval:
    """Mean of n replicate values with its Student-t interval (NaN bounds when n == 1)."""

    mean: float
    low: float
    high: float
    n: int
    std: float  # sample standard deviation (ddof=1; NaN when n == 1)
    confidence: float = 0.95

    @property
    def resolved(self) -> bool:
        """False for a single run: one value says nothing about how much seeds move it."""
        return self.n >= 2

    def __str__(self) -> str:
        if not self.resolved:
            return f"{self.mean:.4g} (1 seed, no interval)"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{n-1} * s / sqrt(n): exact for normal values, and the usual choice for the 3-10 seeds
    a study affords (a bootstrap needs more runs than that to be trusted)."""
    v = _values(values, "mean_interval")
    n, mean = v.size, float(v.mean())
    if n == 1:
        return Interval(mean, NAN, NAN, 1, NAN, confidence)
    std = float(v.std(ddof=1))
    half = _t_half(std / math.sqrt(n), n - 1, confidence)
    return Interval(mean, mean - half, mean + half, n, std, confidence)


@dataclass(frozen=True)
class Difference:
    """a - b with its t-interval: paired (by seed) or Welch (unpaired)."""

    mean: float
    low: float
    high: float
    n_a: int
    n_b: int
    dof: float
    method: str  # "paired t" | "Welch t"
    confidence: float = 0.95

    @property
    def resolved(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def seeds(self) -> str:
        n = f"{self.n_a}" if self.method == "paired t" else f"{self.n_a} and {self.n_b}"
        return f"{n} seed" + ("" if n == "1" else "s")


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """Runs paired by seed (a[i] and b[i] share seed i): the t-interval of the differences. Pairing
    removes what a seed does to both (same data order, same sampling noise), so it resolves smaller
    effects than comparing the two means."""
    a, b = _values(a, "paired_difference a"), _values(b, "paired_difference b")
    if a.shape != b.shape:
        raise ValueError(f"paired runs need equal counts in the same seed order, got {a.size} and {b.size}")
    i = mean_interval(a - b, confidence)
    return Difference(i.mean, i.low, i.high, i.n, i.n, float(i.n - 1), "paired t", confidence)


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """Unpaired fallback (seeds not shared, or counts differ): Welch's t-interval, with the
    Welch-Satterthwaite degrees of freedom (it does not assume equal variances)."""
    a, b = _values(a, "welch_difference a"), _values(b, "welch_difference b")
    mean = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Difference(mean, NAN, NAN, a.size, b.size, NAN, "Welch t", confidence)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    # dof = (va + vb)^2 / (va^2 / (n_a - 1) + vb^2 / (n_b - 1)); both variances 0: any dof, the interval is a point
    denom = va**2 / (a.size - 1) + vb**2 / (b.size - 1)
    dof = float((va + vb) ** 2 / denom) if denom > 0 else float(a.size + b.size - 2)
    half = _t_half(math.sqrt(va + vb), dof, confidence)
    return Difference(mean, mean - half, mean + half, a.size, b.size, dof, "Welch t", confidence)


def verdict(diff: Difference, lower_is_better: bool = True, names: tuple[str, str] = ("A", "B")) -> str:
    """"A better" / "B better" when the interval of a - b excludes 0, else "not distinguishable with
    N seeds" (also for a single seed: no interval, no claim)."""
    if not diff.resolved or diff.low <= 0.0 <= diff.high:
        return f"not distinguishable with {diff.seeds}"
    a_lower = diff.high < 0.0
    return f"{names[0] if a_lower == lower_is_better else names[1]} better"


@dataclass(frozen=True)
class RunBootstrap:
    """A statistic on the runs as they are, and its percentile interval over run resamples."""

    estimate: float  # NaN when the statistic fails on the original runs
    low: float
    high: float
    values: np.ndarray  # the statistic on every resample where it succeeded
    num_failed: int
    num_resamples: int
    confidence: float = 0.95

    @property
    def failed_fraction(self) -> float:
        return self.num_failed / self.num_resamples


def bootstrap_over_runs(groups: Mapping[K, Sequence[T]], statistic: Callable[[dict[K, list[T]]], float | None],
                        num_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> RunBootstrap:
    """Resample whole runs (e.g. one seed's sweep) with replacement within each group (e.g. per
    tokenizer), call statistic({group: runs}) on each resample, and take percentiles.

    The run is the unit because it is what was replicated: points within a run share the seed, so
    resampling points would count correlated values as independent. `statistic` returns None or NaN
    where it cannot be computed (a law that does not fit, no crossover in range); those resamples are
    counted in num_failed and left out, so with many failures the interval describes only the
    resamples where the statistic exists. Exceptions propagate: a bug is not a failed resample.
    A group of one run contributes no variation, and with few runs per group (< ~10) percentile
    intervals are too narrow."""
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    runs = {k: list(v) for k, v in groups.items()}
    if not runs or any(len(v) == 0 for v in runs.values()):
        raise ValueError("every group needs at least one run")

    def value(sample: dict[K, list[T]]) -> float:
        out = statistic(sample)
        return NAN if out is None else float(out)

    rng = np.random.default_rng(seed)
    draws = [value({k: [v[i] for i in rng.integers(0, len(v), len(v))] for k, v in runs.items()})
             for _ in range(num_resamples)]
    ok = np.array([d for d in draws if math.isfinite(d)])
    low, high = np.percentile(ok, [50 * (1 - confidence), 50 * (1 + confidence)]) if ok.size else (NAN, NAN)
    return RunBootstrap(value(runs), float(low), float(high), ok, num_resamples - ok.size, num_resamples, confidence)


@dataclass(frozen=True)
class Component:
    source: str  # a level, or levels joined by "+" whose variances cannot be told apart
    variance: float  # estimate clipped at 0
    estimate: float  # unclipped method-of-moments estimate (can be negative)
    df: int  # degrees of freedom behind it (from 2 df the 95% interval is 0.27x to 39x the estimate)
    fraction: float  # of the summed clipped variances


@dataclass(frozen=True)
class VarianceComponents:
    components: tuple[Component, ...]  # top level first
    dominant: str | None  # source with the largest variance; None when all are 0
    n: int
    notes: tuple[str, ...]


def variance_components(table: Mapping[tuple, float],
                        levels: tuple[str, ...] = ("tokenizer", "generator", "eval")) -> VarianceComponents:
    """How much each seed moves one cell's value, from values keyed (tokenizer_seed, generator_seed,
    eval_seed). The design is nested: a generator seed on another tokenizer is another model, an eval
    seed on another generator another evaluation, so seeds are compared only within their parent.

    Method of moments, bottom up: a level's estimate is the pooled variance of its units' means within
    their parent, minus the part those means inherit from the levels below (unweighted means; equal
    to the classical nested ANOVA estimators when the design is balanced). A level with one unit
    per parent cannot be told from its parent and is merged with it ("generator+eval"); a top level
    with one unit is not estimated. Limits: few seeds give few df, so "dominant" is a point estimate,
    not a test; negative estimates (noise below swamping the level) are clipped to 0 and noted."""
    keys, vals = list(table), _values(list(table.values()), "variance_components")
    if any(not isinstance(k, tuple) or len(k) != len(levels) for k in keys):
        raise ValueError(f"keys must be tuples of {len(levels)} seeds ({', '.join(levels)})")
    notes, merged, positions = [], [], []  # merged[j]: names of effective level j; positions[j]: its key index
    for i, name in enumerate(levels):
        children: dict[tuple, set] = {}
        for k in keys:
            children.setdefault(k[:i], set()).add(k[i])
        if max(len(c) for c in children.values()) > 1:
            merged.append([name])
            positions.append(i)
        elif merged:
            merged[-1].append(name)  # one unit per parent: its variance shows up as the parent's
        else:
            notes.append(f"one {name} seed: its variance is not estimated and not in the total")
    # node -> (mean of its children's means, variance that mean inherits from the levels below)
    nodes = {tuple(k[p] for p in positions): (float(v), 0.0) for k, v in zip(keys, vals)}
    raw, dfs = [], []
    for depth in reversed(range(len(positions))):
        parents: dict[tuple, list[tuple[float, float]]] = {}
        for k, node in nodes.items():
            parents.setdefault(k[:depth], []).append(node)
        ss = inherited = 0.0
        df = 0
        next_nodes = {}
        for p, kids in parents.items():
            means, below = np.array([m for m, _ in kids]), np.array([v for _, v in kids])
            ss += float(((means - means.mean()) ** 2).sum())
            inherited += (len(kids) - 1) * float(below.mean())
            df += len(kids) - 1
            next_nodes[p] = (float(means.mean()), float(below.mean()))
        estimate = (ss - inherited) / df  # E[pooled variance of child means] = sigma^2_level + E[inherited]
        raw.insert(0, estimate)
        dfs.insert(0, df)
        # Var(mean of n children) = (sigma^2_level + mean inherited) / n
        nodes = {p: (m, (estimate + b) / len(parents[p])) for p, (m, b) in next_nodes.items()}
    names = ["+".join(m) for m in merged]
    clipped = [max(r, 0.0) for r in raw]
    total = sum(clipped)
    notes += [f"{n}: estimate {r:.3g} < 0 set to 0 (too small to see against the variance below it)"
              for n, r in zip(names, raw) if r < 0]
    comps = tuple(Component(n, c, r, d, c / total if total > 0 else NAN)
                  for n, c, r, d in zip(names, clipped, raw, dfs))
    dominant = max(comps, key=lambda c: c.variance).source if total > 0 else None
    return VarianceComponents(comps, dominant, len(keys), tuple(notes))
