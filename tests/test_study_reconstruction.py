"""Stage-1 verdicts of the study report: one unit per tokenizer seed, paired by seed, Welch otherwise."""

from __future__ import annotations

import pytest

from twostage.study.reconstruction import reconstruction_lines, tokenizer_comparisons

LABELS = {"a": "baseline", "b": "CRT", "c": "KL"}


def rows_of(cell: str, values: dict[int, dict], generator_runs: int = 3) -> list[dict]:
    """Each tokenizer run's values repeated on `generator_runs` generator rows, as in a results table."""
    return [{"tokenizer_cell": cell, "tokenizer_seed": seed, "generator_seed": g, **v}
            for seed, v in values.items() for g in range(generator_runs)]


def test_pairs_by_tokenizer_seed_and_counts_tokenizer_runs_not_generator_rows():
    rows = rows_of("a", {0: {"rfd": 10.0, "psnr": 23.0}, 1: {"rfd": 11.0, "psnr": 21.0}, 2: {"rfd": 12.0, "psnr": 24.0}})
    rows += rows_of("b", {0: {"rfd": 12.0, "psnr": 22.0}, 1: {"rfd": 13.1, "psnr": 22.5}, 2: {"rfd": 13.9, "psnr": 22.0}})
    cs = {c.metric: c for c in tokenizer_comparisons(rows, LABELS)}
    rfd = cs["rfd"]
    assert (rfd.a, rfd.b, rfd.pairing, rfd.diff.n_a) == ("a", "b", "paired tokenizer seeds", 3)
    assert rfd.diff.mean == pytest.approx(-2.0) and rfd.diff.high < 0 and rfd.verdict == "baseline better"
    # PSNR: higher is better; the per-seed differences (1, -1.5, 2) straddle 0
    assert cs["psnr"].a == "a" and cs["psnr"].verdict == "not distinguishable with 3 seeds"
    assert "codebook_usage" not in cs  # no cell has it
    lines = reconstruction_lines(list(cs.values()), LABELS, "rFD-EffNetLite0")
    assert lines[0].startswith("rFD-EffNetLite0: baseline has lower rFD-EffNetLite0 than CRT: 11 vs 13")
    assert "over 3 paired tokenizer seeds" in lines[0]


def test_unshared_seeds_use_welch_and_one_seed_names_no_winner():
    rows = rows_of("a", {0: {"rfd": 10.0}, 1: {"rfd": 10.5}, 2: {"rfd": 9.5}})
    rows += rows_of("b", {5: {"rfd": 20.0}, 6: {"rfd": 21.0}, 7: {"rfd": 19.0}})
    rows += rows_of("c", {0: {"rfd": 15.0}})
    cs = {(c.a, c.b): c for c in tokenizer_comparisons(rows, LABELS)}
    ab = cs[("a", "b")]
    assert ab.pairing.startswith("unpaired") and ab.diff.method == "Welch t" and ab.verdict == "baseline better"
    ac = cs[("a", "c")]  # c has one seed: a single shared seed is no interval
    assert ac.pairing == "1 seed" and not ac.diff.resolved and ac.verdict.startswith("not distinguishable")


def test_codebook_usage_compares_only_cells_that_have_codes():
    rows = rows_of("a", {0: {"codebook_usage": 1.0}, 1: {"codebook_usage": 0.99}})
    rows += rows_of("b", {0: {"codebook_usage": 0.5}, 1: {"codebook_usage": 0.52}})
    rows += rows_of("c", {0: {"codebook_usage": None}, 1: {"codebook_usage": float("nan")}})
    cs = tokenizer_comparisons(rows, LABELS)
    assert [(c.a, c.b) for c in cs] == [("a", "b")] and cs[0].verdict == "baseline better"
