"""The compute-law fit (twostage/study/fit.py), the frontiers (frontier.py), and the statistics of
replicates: cells over seeds (replicates.py), paired verdicts (verdicts.py), variance components, and
laws fitted to cell means with a bootstrap over whole seeds (seedfits.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from twostage.study.fit import FitResult, fit_law, law
from twostage.study.frontier import (best_per_budget, compute_levels, lower_envelope, optimal_from_fits,
                                     pareto_rfd_gfd, tokenizer_labels)
from twostage.study.replicates import aggregate, ci_text, normalise, series_components
from twostage.study.seedfits import fit_series
from twostage.study.stats import welch_difference
from twostage.study.verdicts import budget_line, compare_cells

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
    # one fitted law beside one without: nothing is compared, and the reader is told which had no law
    alone = optimal_from_fits({"a": fits["a"], "n": fits["none"]})
    assert alone["segments"] == [] and alone["fitted"] == ["a"] and alone["unfitted"] == ["n"]
    assert optimal_from_fits(fits)["unfitted"] == ["none"]


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


# -- replicates: cells, verdicts, variance components, seed-level fits ---------------------------------

def _runs(tok, gen_values, *, tok_seed=0, eval_values=None, protocol="p", cell=None, steps=1000):
    """Rows of one cell: gen_values[j] is generator seed j's value; eval_values[j] its per-eval-seed values."""
    out = []
    for j, v in gen_values.items():
        for k, e in enumerate(eval_values[j] if eval_values else [v]):
            out.append({"run_id": f"{tok}{tok_seed}{j}", "tokenizer_id": f"{tok}{tok_seed}", "tokenizer_label": tok.upper(),
                        "tokenizer_cell": tok, "generator_cell": cell or f"{tok}-{steps}", "tokenizer_seed": tok_seed,
                        "generator_seed": j, "eval_seed": k, "generator_kind": "ar", "generator_size": "s",
                        "train_steps": steps, "compute": 1e14, "gfd": e, "val_loss": v,
                        "gen_protocol": json.dumps({"num_samples": 2000 if protocol == "p" else 500}),
                        "tokens_per_image": 64, "codebook_size": 1024})
    return out


def _compare(a_rows, b_rows, metric="gfd"):
    rows = normalise(a_rows + b_rows)
    labels = tokenizer_labels([{"tokenizer_id": r["tokenizer_cell"], "tokenizer_label": r["tokenizer_label"]} for r in rows])
    cells = aggregate(rows, metric)
    (c,) = compare_cells(cells, metric, labels)
    return c


def test_cell_interval_is_over_the_top_varying_seed_level():
    rows = _runs("a", {0: 10.0, 1: 11.0}, tok_seed=0, eval_values={0: [9.9, 10.1], 1: [10.8, 11.2]}) \
        + _runs("a", {0: 13.0, 1: 12.0}, tok_seed=1, eval_values={0: [12.9, 13.1], 1: [11.9, 12.1]})
    (c,) = aggregate(normalise(rows), "gfd")
    assert c.level == "tokenizer seed" and c.interval.n == 2  # 2 tokenizer seeds, each the mean of its runs
    assert c.interval.mean == pytest.approx(11.5) and c.runs[(1, 0)] == pytest.approx(13.0)
    assert c.interval.low < 11.5 < c.interval.high
    # eval spread pooled within runs: deviations 0.1, 0.2, 0.1, 0.1 (two evals each) -> sd with 4 df
    assert c.eval_df == 4 and c.eval_sd == pytest.approx(math.sqrt((0.02 + 0.08 + 0.02 + 0.02) / 4))
    assert c.components.dominant == "tokenizer"
    (one,) = aggregate(normalise(_runs("b", {0: 7.0})), "gfd")
    assert one.interval.n == 1 and ci_text(one.interval) == "7 (1 seed: no interval)" and one.components is None
    # A table written before the replicate columns: every run its own cell, seeds 0.
    legacy = normalise([{"run_id": "r", "tokenizer_id": "t", "compute": 1.0}])[0]
    assert (legacy["tokenizer_cell"], legacy["generator_cell"], legacy["eval_seed"]) == ("t", "r", 0)


def test_verdicts_clear_effect_noise_level_and_one_seed():
    base = {0: 10.0, 1: 11.0, 2: 12.0}  # generator seeds move both tokenizers alike
    clear = _compare(_runs("a", base), _runs("b", {j: v - 2 + d for (j, v), d in zip(base.items(), (0.05, -0.05, 0))}))
    assert clear.verdict == "B better" and clear.winner == "B" and clear.pairing == "paired generator seeds"
    assert clear.diff.n_a == 3 and clear.diff.high < 0
    assert "B has lower FD than A: −2 [" in budget_line([clear], "FD") and "over 3 paired generator seeds" in \
        budget_line([clear], "FD")
    # The same values unpaired cannot tell (the seed-to-seed spread swamps a difference of 2).
    w = welch_difference(list(base.values()), [v - 2 for v in base.values()])
    assert w.low < 0 < w.high
    noise = _compare(_runs("a", base), _runs("b", {j: v + d for (j, v), d in zip(base.items(), (0.3, -0.4, 0.1))}))
    assert noise.verdict == "not distinguishable with 3 seeds" and noise.winner is None
    assert "not distinguishable with 3 seeds" in budget_line([noise], "FD")
    one = _compare(_runs("a", {0: 10.0}), _runs("b", {0: 1.0}))
    assert one.winner is None and one.verdict == "not distinguishable with 1 seed"
    line = budget_line([one], "FD")
    assert "1 seed: no interval, no winner" in line and "better" not in line and "has lower" not in line
    unpaired = _compare(_runs("a", base), _runs("b", {3: 5.0, 4: 5.5, 5: 6.0}))
    assert unpaired.diff.method == "Welch t" and unpaired.pairing.startswith("unpaired") and unpaired.winner == "B"
    other = _compare(_runs("a", base), _runs("b", base, protocol="q"))
    assert other.verdict == "not compared" and other.diff is None and "protocols differ" in other.pairing


def test_comparison_is_ordered_by_the_evidence_it_rests_on():
    # a's mean is better only through seed 2, which b lacks; on the shared seeds b is better
    c = _compare(_runs("a", {0: 10.0, 1: 11.0, 2: 1.0}), _runs("b", {0: 9.0, 1: 10.2}))
    assert c.a.tokenizer_cell == "b" and c.diff.mean < 0 and c.diff.n_a == 2 and c.pairing == "paired generator seeds"


def test_paired_by_tokenizer_seed_when_several_are_shared():
    a = _runs("a", {0: 10.0, 1: 10.4}, tok_seed=0) + _runs("a", {0: 12.0, 1: 12.2}, tok_seed=1) \
        + _runs("a", {0: 11.0, 1: 11.1}, tok_seed=2)
    b = _runs("b", {0: 9.0, 1: 9.5}, tok_seed=0) + _runs("b", {0: 11.1, 1: 11.0}, tok_seed=1) \
        + _runs("b", {0: 10.0, 1: 10.2}, tok_seed=2)
    c = _compare(a, b)
    assert c.pairing == "paired tokenizer seeds" and c.diff.n_a == 3 and c.winner == "B"


def test_variance_components_name_the_dominant_seed():
    from study_synthetic import TOKENIZERS, make_rows

    kw = dict(tokenizers=TOKENIZERS[:1], sizes={"small": 2_000_000}, steps=[1000, 4000], tokenizer_seeds=[0, 1, 2],
              generator_seeds=[0, 1], eval_seeds=[0, 1], seed=5)
    for big, want in (("sd_tokenizer", "tokenizer"), ("sd_generator", "generator"), ("sd_eval", "eval")):
        sds = {"sd_tokenizer": 0.005, "sd_generator": 0.005, "sd_eval": 0.005, big: 0.3}
        cells = aggregate(normalise(make_rows(**kw, **sds)), "gfd")
        pooled = series_components(cells)
        assert pooled["dominant"] == want and pooled["cells"] == 2, (big, pooled)
        assert {s for s in pooled["sources"]} == {"tokenizer", "generator", "eval"}
    loss = series_components(aggregate(normalise(make_rows(**kw, sd_generator=0.3)), "val_loss"))
    assert set(loss["sources"]) == {"tokenizer", "generator"}  # a validation loss has no evaluation seed


def _seed_series(generator_seeds, sd, seed=0, n_boot=100):
    from study_synthetic import TOKENIZERS, make_rows

    rows = normalise(make_rows(tokenizers=TOKENIZERS[:2], generator_seeds=generator_seeds, sd_generator=sd, seed=seed))
    labels = tokenizer_labels([{"tokenizer_id": r["tokenizer_cell"], "tokenizer_label": r["tokenizer_label"]} for r in rows])
    return fit_series(aggregate(rows, "gfd"), labels, {"metric": "gfd"}, n_boot=n_boot, seed=1)


def test_seed_bootstrap_resolves_a_crossover_and_refits_whole_seeds():
    sf = _seed_series([0, 1, 2, 3], 0.01)
    assert sf["level"] == "generator seed" and sf["n_units"] == {"tokf4k1024": 4, "tokf8k1024": 4}
    # whole seeds resampled, the same draw for both tokenizers: at most C(2n-1, n) distinct fits each
    assert sf["resample"]["paired"] and sf["resample"]["distinct_fits"] <= 2 * math.comb(7, 4)
    (x,) = sf["crossovers"]
    assert (x["from"], x["to"]) == ("tokf8k1024", "tokf4k1024") and x["resolved"] and x["status"] == "resolved"
    assert x["measured"][0] <= x["low"] <= x["compute"] <= x["high"] <= x["measured"][1] and x["lost"] <= 0.05
    # where the noiseless laws cross
    truth = optimal_from_fits(_seed_series([0], 0.0, n_boot=0)["fits"])
    assert x["compute"] == pytest.approx(truth["crossovers"][0]["compute"], rel=0.25)
    for tc, ci in sf["seed_ci"].items():
        assert ci["units"] == 4 and ci["alpha"][0] <= sf["fits"][tc].params["alpha"] <= ci["alpha"][1]
    assert _seed_series([0, 1, 2, 3], 0.01)["crossovers"] == sf["crossovers"]  # seeded


def test_seed_bootstrap_reports_an_unresolved_crossover_and_one_seed_has_none():
    noisy = _seed_series([0, 1, 2], 0.5, seed=0)
    assert noisy["crossovers"]
    for x in noisy["crossovers"]:
        assert not x["resolved"] and x["status"].startswith("not resolved")
    one = _seed_series([0], 0.0, n_boot=10)
    assert one["level"] is None and one["seed_ci"] == {} and one["crossovers"]
    assert all(x["status"] == "1 seed: no interval" and x["low"] is None for x in one["crossovers"])


def test_the_optimum_lines_name_the_tokenizers_without_a_law():
    from twostage.study.render import _optimal_lines

    labels = {"a": "A", "b": "B", "n": "N"}
    one = {"optimal": {"segments": [], "fitted": ["a"], "unfitted": ["n"]}, "crossovers": [], "name": "FD"}
    assert _optimal_lines(one, labels) == ["only A has a fitted law: no comparison"]
    seg = {"c_lo": 1e12, "c_hi": 1e14, "key": "a", "extrapolated": False}
    two = {"optimal": {"segments": [seg], "fitted": ["a", "b"], "unfitted": ["n"]}, "crossovers": [], "name": "FD"}
    assert _optimal_lines(two, labels)[-1] == "among the fitted laws only: N not compared (no fitted law)"
