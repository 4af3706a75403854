"""Statistics over replicate runs (twostage/study/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from twostage.study.stats import (bootstrap_over_runs, mean_interval, paired_difference, variance_components,
                                  verdict, welch_difference)


def test_mean_interval_is_the_student_t_interval():
    v = [3.1, 2.7, 3.6, 3.0, 2.9]
    i = mean_interval(v)
    lo, hi = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert (i.low, i.high) == pytest.approx((lo, hi), rel=1e-12)
    assert i.n == 5 and i.resolved and i.std == pytest.approx(np.std(v, ddof=1))
    assert mean_interval(v, confidence=0.8).high < i.high
    assert str(i).endswith("(n=5)")


def test_one_run_has_no_interval():
    i = mean_interval([4.2])
    assert i.mean == 4.2 and i.n == 1 and not i.resolved
    assert math.isnan(i.low) and math.isnan(i.high) and math.isnan(i.std)
    assert "1 seed, no interval" in str(i)
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError):
        mean_interval([])


def test_t_interval_coverage_is_nominal():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        i = mean_interval(rng.normal(10.0, 2.0, 5))
        covered += i.low <= 10.0 <= i.high
    assert 0.90 <= covered / 400 <= 0.99


def test_paired_verdicts():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0.0, 5.0, 5)  # what a seed does to both tokenizers: pairing removes it
    a = 20.0 + seed_effect + rng.normal(0.0, 0.3, 5)
    b = 22.0 + seed_effect + rng.normal(0.0, 0.3, 5)
    d = paired_difference(a, b)
    assert d.method == "paired t" and d.n_a == d.n_b == 5 and d.dof == 4
    assert d.high < 0
    assert verdict(d) == "A better"  # lower FD wins
    assert verdict(d, lower_is_better=False) == "B better"  # e.g. precision
    assert verdict(d, names=("vq f8", "vq f16")) == "vq f8 better"
    # the same runs unpaired: the seed effect swamps the 2-point difference
    assert verdict(welch_difference(a, b)) == "not distinguishable with 5 and 5 seeds"

    noise = paired_difference(20.0 + rng.normal(0, 1, 5), 20.0 + rng.normal(0, 1, 5))
    assert noise.low < 0 < noise.high
    assert verdict(noise) == "not distinguishable with 5 seeds"
    one = paired_difference([20.0], [25.0])
    assert not one.resolved and verdict(one) == "not distinguishable with 1 seed"
    with pytest.raises(ValueError, match="seed order"):
        paired_difference([1.0, 2.0], [1.0])


def test_welch_matches_scipy_and_handles_small_groups():
    a, b = [1.0, 2.0, 3.5], [2.0, 4.0, 5.0, 7.0]
    d = welch_difference(a, b)
    ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert d.method == "Welch t" and (d.n_a, d.n_b) == (3, 4)
    single = welch_difference([1.0], [2.0, 3.0])
    assert not single.resolved and verdict(single) == "not distinguishable with 1 and 2 seeds"
    assert verdict(welch_difference([1.0, 1.0], [3.0, 3.0])) == "A better"  # no spread: a point interval


def test_bootstrap_over_runs_resamples_whole_runs():
    runs = {"A": [{"seed": s, "fd": 10.0 + s} for s in range(6)], "B": [{"seed": s, "fd": 14.0 + s} for s in range(6)]}
    seen = set()

    def gap(sample):
        seen.update(id(r) for rs in sample.values() for r in rs)
        return np.mean([r["fd"] for r in sample["B"]]) - np.mean([r["fd"] for r in sample["A"]])

    r = bootstrap_over_runs(runs, gap, num_resamples=300, seed=0)
    assert seen <= {id(x) for rs in runs.values() for x in rs}  # runs are passed whole, never split
    assert r.estimate == pytest.approx(4.0) and r.num_failed == 0 and r.values.shape == (300,)
    assert r.low < 4.0 < r.high and r.high - r.low < 6.0
    again = bootstrap_over_runs(runs, gap, num_resamples=300, seed=0)
    assert np.array_equal(again.values, r.values)


def test_bootstrap_over_runs_counts_failures():
    runs = {"A": [1.0, 2.0, 3.0, 100.0]}

    def fragile(sample):  # fails (None or NaN) whenever the outlier run is drawn
        values = sample["A"]
        if 100.0 in values:
            return None if values.count(100.0) == 1 else float("nan")
        return float(np.mean(values))

    r = bootstrap_over_runs(runs, fragile, num_resamples=400, seed=0)
    assert math.isnan(r.estimate)  # the original runs include the outlier
    # P(no outlier in 4 draws) = (3/4)^4 = 0.32
    assert 0.6 < r.failed_fraction < 0.76 and r.num_failed + r.values.size == 400
    assert 1.0 <= r.low <= r.high <= 3.0
    with pytest.raises(ZeroDivisionError):  # a bug is not a failure
        bootstrap_over_runs(runs, lambda s: 1 / 0, num_resamples=3)


def _nested(sd: tuple[float, float, float], sizes: tuple[int, int, int], seed: int) -> dict[tuple, float]:
    rng = np.random.default_rng(seed)
    table = {}
    for t in range(sizes[0]):
        ut = rng.normal(0, sd[0])
        for g in range(sizes[1]):
            ug = rng.normal(0, sd[1])
            for e in range(sizes[2]):
                table[(t, g, e)] = 50.0 + ut + ug + rng.normal(0, sd[2])
    return table


def test_variance_components_equal_nested_anova_when_balanced():
    table = _nested((0.3, 2.0, 0.5), (4, 5, 3), 0)
    y = np.array([[[table[(t, g, e)] for e in range(3)] for g in range(5)] for t in range(4)])
    T, G, E = y.shape
    ms_e = ((y - y.mean(2, keepdims=True)) ** 2).sum() / (T * G * (E - 1))
    ms_g = E * ((y.mean(2) - y.mean((1, 2))[:, None]) ** 2).sum() / (T * (G - 1))
    ms_t = G * E * ((y.mean((1, 2)) - y.mean()) ** 2).sum() / (T - 1)
    r = variance_components(table)
    est = [c.estimate for c in r.components]
    assert est == pytest.approx([(ms_t - ms_g) / (G * E), (ms_g - ms_e) / E, ms_e], rel=1e-10)
    assert [c.source for c in r.components] == ["tokenizer", "generator", "eval"]
    assert [c.df for c in r.components] == [3, 16, 40]
    assert r.dominant == "generator" and r.n == 60
    assert sum(c.fraction for c in r.components) == pytest.approx(1.0)


def test_variance_components_merge_unreplicated_levels_and_clip():
    one_eval = variance_components(_nested((0.1, 1.0, 0.1), (3, 4, 1), 1))
    assert [c.source for c in one_eval.components] == ["tokenizer", "generator+eval"]
    one_tok = variance_components(_nested((0.0, 0.2, 3.0), (1, 3, 4), 2))
    assert [c.source for c in one_tok.components] == ["generator", "eval"] and one_tok.dominant == "eval"
    assert "one tokenizer seed" in one_tok.notes[0]
    # generator effects hidden under eval noise: a negative moment estimate, clipped and noted
    flat = {(0, g, e): v for g, e, v in [(0, 0, 0.0), (0, 1, 10.0), (1, 0, 10.0), (1, 1, 0.0)]}
    r = variance_components(flat)
    gen = r.components[0]
    assert gen.estimate < 0 and gen.variance == 0 and any("set to 0" in n for n in r.notes)
    assert variance_components({(0, 0, 0): 1.0}).components == ()
    with pytest.raises(ValueError, match="tuples of 3"):
        variance_components({(0, 0): 1.0})
