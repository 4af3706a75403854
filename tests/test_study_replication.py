"""`twostage study replication ORIGINAL RERUN`: verdicts matched across two runs of one study, the
status of each, the exit code that gates a claim, and the table of tokenizer runs trained twice."""

from __future__ import annotations

import json

import pytest
import yaml

from study_synthetic import TOKENIZERS, VERDICT_TOKENIZERS, make_rows, write_results
from twostage import cli
from twostage.study.replication import (CONTRADICTED, HOLDS, NOT_REPLICATED, ONLY_ORIGINAL, ONLY_RERUN, RESOLVED, TIE,
                                        Verdict, compare_verdicts, load_verdicts, replication_report,
                                        spec_differences)
from twostage.study.report import build_report


def _verdict(metric: str, winner: str | None, where: str = "ar tiny, 1000 steps") -> Verdict:
    return Verdict("generation", metric, where, ("A", "B"), winner, "A - B = ...")


def test_statuses_of_matched_verdicts():
    original = [_verdict("loss", "A"), _verdict("fd", "A"), _verdict("kid", "A"), _verdict("psnr", None),
                _verdict("ssim", None), _verdict("usage", "B")]
    rerun = [_verdict("loss", "A"), _verdict("fd", "B"), _verdict("kid", None), _verdict("psnr", "A"),
             _verdict("ssim", None), _verdict("rfd", "A")]
    status = {r.verdict.metric: r.status for r in compare_verdicts(original, rerun)}
    assert status == {"loss": HOLDS, "fd": CONTRADICTED, "kid": NOT_REPLICATED, "psnr": RESOLVED, "ssim": TIE,
                      "usage": ONLY_ORIGINAL, "rfd": ONLY_RERUN}
    failed = {r.verdict.metric for r in compare_verdicts(original, rerun) if r.failed}
    assert failed == {"fd", "kid", "usage"}  # a winner of the original that the re-run does not confirm


def test_verdicts_match_by_budget_and_pair_not_by_position():
    original = [_verdict("loss", "A", "ar tiny, 1000 steps"), _verdict("loss", "B", "ar tiny, 3000 steps")]
    rerun = list(reversed([_verdict("loss", "A", "ar tiny, 1000 steps"), _verdict("loss", "B", "ar tiny, 3000 steps")]))
    assert [r.status for r in compare_verdicts(original, rerun)] == [HOLDS, HOLDS]


def _report(tmp_path, name: str, seed: int, generator_seeds: list[int], tokenizer_seed: int):
    rows = make_rows(tokenizers=VERDICT_TOKENIZERS + TOKENIZERS[:1], tokenizer_seeds=[tokenizer_seed],
                     generator_seeds=generator_seeds, eval_seeds=[0],
                     sd_shared=0.1, sd_generator=0.03, sd_eval=0.02, seed=seed)
    folder = write_results(tmp_path / name, rows, grids=False)
    build_report(folder, n_boot=20)
    return folder


def test_real_reports_of_two_seed_sets(tmp_path, capsys):
    """Two synthetic studies with other seeds: CRT's clear advantage over the baseline holds wherever the
    original names it; the exit code says whether every winner held; the table is printed and written.
    (Not every winner holds: with dozens of comparisons at 95%, some "winners" between equal tokenizers —
    the twin has the baseline's laws — are noise, which is what this command exposes.)"""
    a = _report(tmp_path, "a", seed=3, generator_seeds=[0, 1, 2], tokenizer_seed=0)
    b = _report(tmp_path, "b", seed=11, generator_seeds=[3, 4, 5], tokenizer_seed=1)
    verdicts = load_verdicts(a)
    assert any(v.winner for v in verdicts) and all(v.pair[0] < v.pair[1] for v in verdicts)
    assert all(" seed" in v.evidence for v in verdicts)  # each with its difference and seed count
    text, rows = replication_report(a, b)
    crt = [r for r in rows if r.verdict.pair == ("CRT", "baseline") and r.verdict.stage == "generation"
           and r.original is not None and r.original.winner is not None]
    assert crt and all(r.status == HOLDS and r.original.winner == "CRT" for r in crt)
    out = tmp_path / "replication.md"
    code = cli.main(["study", "replication", str(a), str(b), "--out", str(out)])
    assert code == (1 if any(r.failed for r in rows) else 0)
    printed = capsys.readouterr().out
    assert printed == out.read_text() == text
    assert "shares seeds" not in text  # seeds 0 / 0-2 vs 1 / 3-5: an independent check


def _fits(folder, verdict: str, winner: str | None):
    (folder / "report").mkdir(parents=True)
    d = {"metric": "val_loss", "series": "val loss", "generator_kind": "ar", "generator_size": "tiny",
         "train_steps": 1000, "a": "c1", "b": "c2", "label_a": "crt", "label_b": "base", "verdict": verdict,
         "winner": winner, "difference": {"mean": -1.0, "low": -1.5, "high": -0.5, "n_a": 3}}
    fits = {"verdicts": [d], "reconstruction_verdicts": [], "context_gain_verdicts": [],
            "design": {"seeds": {"tokenizer": [0, 1, 2], "generator": [0, 1, 2]}}}
    (folder / "report" / "fits.json").write_text(json.dumps(fits))


def test_a_winner_that_does_not_hold_fails_the_command(tmp_path, capsys):
    _fits(tmp_path / "a", "crt better", "crt")
    _fits(tmp_path / "b", "not distinguishable with 3 seeds", None)
    assert cli.main(["study", "replication", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    text = capsys.readouterr().out
    assert "0 of 1 winners of the original hold in the re-run**; 1 do not." in text
    assert "**not replicated**" in text and "shares seeds" in text  # the same seed lists: not independent


def test_missing_report_is_a_clear_error(tmp_path, capsys):
    _fits(tmp_path / "a", "crt better", "crt")
    assert cli.main(["study", "replication", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "twostage study report" in capsys.readouterr().err


def _tokenizer_run(folder, run_id: str, seed: int, rfd: float):
    run = folder / "tokenizers" / run_id
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}, "crt": {"enabled": False}}))
    (run / "eval" / "recon.json").write_text(json.dumps({"metrics": {"rFD-EffNetLite0": rfd, "PSNR": 22.0},
                                                         "protocol": {}}))


def test_tokenizer_runs_trained_in_both_are_listed_even_without_reports(tmp_path):
    _tokenizer_run(tmp_path / "a", "t0", 0, 9.33)
    _tokenizer_run(tmp_path / "b", "t0", 0, 10.18)
    _tokenizer_run(tmp_path / "b", "t9", 9, 1.0)  # only in the re-run: not a re-run of anything
    text, rows = replication_report(tmp_path / "a", tmp_path / "b")
    assert rows == [] and "No verdicts compared" in text
    assert "| t0 | 0 | no | 9.33 / 10.18 | 22 / 22 |" in text and "t9" not in text


@pytest.mark.parametrize("missing", ["original", "rerun"])
def test_no_reports_and_no_shared_runs_raise(tmp_path, missing):
    _fits(tmp_path / ("b" if missing == "original" else "a"), "crt better", "crt")
    with pytest.raises(Exception, match="study report"):
        replication_report(tmp_path / "a", tmp_path / "b")


def test_spec_differences_name_what_changed_beyond_seeds(tmp_path):
    a = {"name": "crt", "tokenizer": {"steps": 2000, "overrides": ["x=1"]}, "seeds": {"tokenizer": [0, 1, 2]}}
    b = {"name": "crt", "tokenizer": {"steps": 3000, "overrides": ["x=1"]}, "budgets": [10],
         "seeds": {"tokenizer": [3, 4, 5]}}
    assert spec_differences(a, b) == ["tokenizer.steps: 2000 -> 3000", "budgets: (unset) -> [10]"]
    assert spec_differences(a, {**a, "seeds": {"tokenizer": [7]}}) == []  # other seeds only: a replication
    for name, spec in (("a", a), ("b", b)):
        _fits(tmp_path / name, "crt better", "crt")
        (tmp_path / name / "study.yaml").write_text(yaml.safe_dump(spec))
    text, _ = replication_report(tmp_path / "a", tmp_path / "b")
    assert "The specs differ beyond seeds" in text and "`tokenizer.steps: 2000 -> 3000`" in text
