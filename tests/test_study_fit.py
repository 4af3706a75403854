"""The compute-law fit (twostage/study/fit.py) and the frontiers (twostage/study/frontier.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twostage.study.fit import FitResult, fit_law, law
from twostage.study.frontier import (best_per_budget, compute_levels, lower_envelope, optimal_from_fits,
                                     pareto_rfd_gfd, tokenizer_labels)

TRUTH = {"alpha": -0.3, "lambda": 9.0, "l_min": 2.5}
C = np.geomspace(1e13, 1e17, 9)


def _covers(ci, truth):
    return all(ci[k][0] <= truth[k] <= ci[k][1] for k in truth)


def test_exact_data_recovers_parameters():
    L = law(C, TRUTH["alpha"], TRUTH["lambda"], TRUTH["l_min"])
    f = fit_law(C, L, n_boot=50, key={"tokenizer_id": "t"})
    assert f.ok and f.n_points == 9 and f.n_distinct == 9 and f.l_min_free
    for k, v in TRUTH.items():
        assert f.params[k] == pytest.approx(v, rel=1e-6, abs=1e-8)
    assert f.rmse_log < 1e-10
    assert np.allclose(f.predict(C), L, rtol=1e-9)
    # No noise: both intervals collapse onto the truth (up to rounding) and still contain it.
    for method in ("cov", "bootstrap"):
        for k, v in TRUTH.items():
            lo, hi = f.ci[method][k]
            assert lo - 1e-6 <= v <= hi + 1e-6 and hi - lo < 1e-4


def test_noisy_data_ci_covers_truth():
    base = law(C, TRUTH["alpha"], TRUTH["lambda"], TRUTH["l_min"])
    rng = np.random.default_rng(0)
    covered_cov = 0
    reps = 40
    for _ in range(reps):
        f = fit_law(C, base * np.exp(rng.normal(0, 0.01, len(C))), n_boot=0)
        assert f.ok and "bootstrap" not in f.ci
        covered_cov += _covers(f.ci["cov"], TRUTH)
    # Nominal 95% per parameter; the three are strongly correlated, so joint coverage stays high.
    assert covered_cov >= 0.8 * reps
    # One seeded replicate with the bootstrap interval (the one the report shows).
    noisy = base * np.exp(np.random.default_rng(7).normal(0, 0.01, len(C)))
    f = fit_law(C, noisy, n_boot=300, seed=3)
    assert f.n_boot == 300 and _covers(f.ci["bootstrap"], TRUTH)
    assert f.params["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.08)
    assert f.params["l_min"] == pytest.approx(TRUTH["l_min"], abs=0.15)


def test_bootstrap_is_seeded_and_order_independent():
    L = law(C, -0.3, 9.0, 2.5) * np.exp(np.random.default_rng(1).normal(0, 0.02, len(C)))
    a = fit_law(C, L, n_boot=60, seed=5, key={"t": 1})
    perm = np.random.default_rng(2).permutation(len(C))
    b = fit_law(C[perm], L[perm], n_boot=60, seed=5, key={"t": 1})
    assert a.ci == b.ci and a.params == b.params
    c = fit_law(C, L, n_boot=60, seed=6, key={"t": 1})
    assert c.ci["bootstrap"] != a.ci["bootstrap"]


def test_fixed_l_min_power_law_with_three_points():
    c = np.array([1e14, 1e15, 1e16])
    f = fit_law(c, law(c, -0.5, 20.0, 0.0), l_min=0.0, n_boot=20)
    assert f.ok and not f.l_min_free
    assert f.params["alpha"] == pytest.approx(-0.5) and f.params["lambda"] == pytest.approx(20.0)
    assert f.params["l_min"] == 0.0 and f.ci["cov"]["l_min"] == [0.0, 0.0]


@pytest.mark.parametrize("compute, values, l_min, distinct", [
    ([1e14, 1e15, 1e16], [5.0, 4.0, 3.5], None, 3),              # 3 distinct C, L_min free: need 4
    ([1e14, 1e14, 1e15, 1e15, 1e16], [5, 4.9, 4, 3.9, 3.5], None, 3),  # repeats do not count
    ([1e14, 1e15], [5.0, 4.0], 0.0, 2),                            # fixed L_min needs 3
    ([], [], None, 0),
    ([1e14, -1.0, 1e15, 1e16, float("nan")], [5.0, 4.5, 4.0, 3.5, 3.0], None, 3),  # invalid points dropped
])
def test_too_few_points_is_a_clear_result(compute, values, l_min, distinct):
    f = fit_law(compute, values, l_min=l_min)
    assert f.status == "insufficient" and not f.ok
    assert f.message.startswith("not enough points to fit") and f.n_distinct == distinct
    assert f.params == {} and f.ci == {}
    with pytest.raises(ValueError, match="no fitted law"):
        f.predict(1e15)
    assert f.to_dict()["status"] == "insufficient"


def test_invalid_points_are_noted_and_flat_data_does_not_crash():
    f = fit_law([1e13, 1e14, 1e15, 1e16, 0.0], [5.0, 4.0, 3.5, 3.3, 2.0], n_boot=10)
    assert f.ok and f.n_points == 4 and any("left out" in n for n in f.notes)
    flat = fit_law(C, np.full(len(C), 3.0) * np.exp(np.random.default_rng(0).normal(0, 0.01, len(C))), n_boot=10)
    assert flat.status == "ok" and all(np.isfinite(list(flat.params.values())))
    rising = fit_law(C, np.linspace(2.0, 4.0, len(C)), n_boot=10)
    assert rising.ok and rising.params["alpha"] > 0 and any("does not fall" in n for n in rising.notes)
    bad = fit_law([1e13, 1e14, 1e15], [3.0, 2.0, 1.0], l_min=2.0)
    assert bad.status == "failed" and "must lie in" in bad.message
    with pytest.raises(ValueError, match="differ in length"):
        fit_law([1.0, 2.0], [1.0])


# -- frontier --------------------------------------------------------------------------------------

def _row(run, tok, c, **metrics):
    return {"run_id": run, "tokenizer_id": tok, "tokenizer_label": tok.upper(), "generator_size": "s",
            "generator_label": f"gen {run}", "compute": c, **metrics}


def test_compute_levels_group_nearby_budgets():
    assert compute_levels([1e14, 1.02e14, 1e15, 3e15, 2.9e15]) == [1.02e14, 1e15, 3e15]
    assert compute_levels([]) == []


def test_lower_envelope_and_best_per_budget():
    rows = [_row("a1", "a", 1e13, val_loss=5.0), _row("b1", "b", 1e13, val_loss=5.5),
            _row("a2", "a", 1e14, val_loss=4.0), _row("b2", "b", 1.01e14, val_loss=3.8),
            _row("a3", "a", 1e15, val_loss=4.1),  # worse than the cheaper b2: not on the envelope
            _row("b3", "b", 1e16, val_loss=3.0), _row("x", "b", 1e16, val_loss=None)]
    env = lower_envelope(rows, "val_loss")
    assert [e["run_id"] for e in env] == ["a1", "a2", "b2", "b3"]
    budgets = best_per_budget(rows, "val_loss")
    assert [b["budget"] for b in budgets] == [1e13, 1.01e14, 1e15, 1e16]
    assert [b["best_within"]["run_id"] for b in budgets] == ["a1", "b2", "b2", "b3"]
    assert [b["best_at_level"]["run_id"] for b in budgets] == ["a1", "b2", "a3", "b3"]
    # A budget below every run has no answer rather than a wrong one.
    assert best_per_budget(rows, "val_loss", budgets=[1e12]) == [{"budget": 1e12, "best_within": None,
                                                                  "best_at_level": None}]


def test_optimal_tokenizer_and_crossover_from_fitted_laws():
    # Two pure power laws cross where lam_a + alpha_a x = lam_b + alpha_b x.
    a, b = (-0.2, 8.0), (-0.4, 14.0)
    x_star = (b[1] - a[1]) / (a[0] - b[0])
    c = np.geomspace(1e12, 1e16, 6)
    fits = {"a": fit_law(c, law(c, *a, 0.0), l_min=0.0, n_boot=0),
            "b": fit_law(c, law(c, *b, 0.0), l_min=0.0, n_boot=0),
            "none": fit_law(c[:2], [1.0, 0.5], n_boot=0)}
    opt = optimal_from_fits(fits)
    assert len(opt["crossovers"]) == 1
    x = opt["crossovers"][0]
    assert x["from"] == "a" and x["to"] == "b"
    assert math.log(x["compute"]) == pytest.approx(x_star, abs=1e-8)
    assert [(s["key"], s["extrapolated"]) for s in opt["segments"]] == [("a", False), ("b", False)]
    assert opt["segments"][0]["c_lo"] == pytest.approx(1e12) and opt["segments"][1]["c_hi"] == pytest.approx(1e16)
    assert set(opt["winner"]) == {"a", "b"} and len(opt["grid"]) == 400
    # A law whose runs cover only part of the range gets its extrapolated part split off.
    c2 = np.geomspace(1e14, 1e16, 5)
    fits2 = {"a": fits["a"], "b": fit_law(c2, law(c2, -0.4, 13.0, 0.0), l_min=0.0, n_boot=0)}
    # b's law (crossing a at C = e^25, below the range) wins everywhere; below 1e14 only by extrapolation.
    segs = optimal_from_fits(fits2)["segments"]
    assert [(s["key"], s["extrapolated"]) for s in segs] == [("b", True), ("b", False)]
    assert segs[0]["c_hi"] == pytest.approx(1e14) and segs[1]["c_lo"] == pytest.approx(1e14)
    assert optimal_from_fits({"n": fits["none"]})["segments"] == []


def test_pareto_rfd_vs_best_gfd():
    rows = [_row("a1", "a", 1e13, rfd=2.0, gfd=9.0), _row("a2", "a", 1e14, rfd=2.0, gfd=7.0),
            _row("b1", "b", 1e13, rfd=1.0, gfd=8.0), _row("c1", "c", 1e13, rfd=3.0, gfd=7.5),
            _row("d1", "d", 1e13, rfd=0.5, gfd=None), _row("e1", "e", 1e13, rfd=1.0, gfd=8.0)]
    out = {p["tokenizer_id"]: p for p in pareto_rfd_gfd(rows)}
    assert out["a"]["best_gfd"] == 7.0 and out["a"]["best_run_id"] == "a2"
    assert out["a"]["pareto"] and out["b"]["pareto"] and out["e"]["pareto"]  # b, e tie: neither dominates
    assert not out["c"]["pareto"]  # a has lower rFD and gFD
    assert not out["d"]["pareto"] and out["d"]["best_gfd"] is None
    assert [p["tokenizer_id"] for p in pareto_rfd_gfd(rows)] == ["d", "b", "e", "a", "c"]


def test_tokenizer_labels_disambiguate_shared_labels():
    rows = [{"tokenizer_id": "aaaaaaaaaa1", "tokenizer_label": "vq f8"},
            {"tokenizer_id": "bbbbbbbbbb2", "tokenizer_label": "vq f8"},
            {"tokenizer_id": "c", "tokenizer_label": None}]
    assert tokenizer_labels(rows) == {"aaaaaaaaaa1": "vq f8 [aaaaaaaa]", "bbbbbbbbbb2": "vq f8 [bbbbbbbb]", "c": "c"}


def test_fit_result_round_trips_to_json():
    import json

    f = fit_law(C, law(C, -0.3, 9.0, 2.5), n_boot=5, key={"tokenizer_id": "t"})
    d = json.loads(json.dumps(f.to_dict()))
    assert d["params"]["alpha"] == pytest.approx(-0.3) and d["ci_level"] == 0.95
    assert isinstance(f, FitResult) and d["points"]["compute"] == sorted(C.tolist())


def test_primary_ci_is_wald_unless_l_min_sits_at_its_bound():
    noisy = law(C, -0.3, 9.0, 2.5) * np.exp(np.random.default_rng(4).normal(0, 0.01, len(C)))
    f = fit_law(C, noisy, n_boot=20)
    assert f.primary_ci == ("cov", f.ci["cov"])
    assert 0.0 <= f.ci["cov"]["l_min"][0] and f.ci["cov"]["l_min"][1] <= noisy.min()
    f.l_min_at_bound = True  # the Wald linearisation is meaningless at a bound
    assert f.primary_ci == ("bootstrap", f.ci["bootstrap"])
    assert fit_law(C, noisy, n_boot=0).primary_ci[0] == "cov"
