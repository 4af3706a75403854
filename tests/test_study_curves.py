"""Tokenizer training curves in the study report (twostage/study/curves.py): the convergence verdict at
the 2% threshold, reading RUN/val records or metrics.jsonl, and the report section with a figure per
tokenizer, on a synthetic study folder with fake tokenizer run folders."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from study_synthetic import VERDICT_TOKENIZERS, make_rows, write_results
from twostage.study.curves import SeedCurve, convergence, read_run
from twostage.study.report import build_report

RFD = "rFD-EffNetLite0"


def _curve(seed: int, rfd: list[float]) -> SeedCurve:
    return SeedCurve(seed, f"tokenizers/t{seed}", RFD, {"rfd": [(1000 * (i + 1), v) for i, v in enumerate(rfd)]})


def _write_run(run: Path, rfd: list[float], step: int = 1000, usage: bool = True) -> None:
    """A tokenizer run folder as training with monitor.val_images writes it."""
    (run / "val").mkdir(parents=True)
    lines = []
    for i, v in enumerate(rfd):
        s = step * (i + 1)
        record = {"step": s, "psnr": 20.0 + i, "ssim": 0.5, RFD: v, "weights": "ema",
                  "protocol": {"num_samples": 1000, "feature_network": "EffNetLite0"}}
        if usage:
            record["codebook_usage"] = 0.5 + 0.1 * i
        (run / "val" / f"step_{s:07d}.json").write_text(json.dumps(record))
        lines += [json.dumps({"step": s - step // 2, "autoencoder/usage": 0.4 + 0.1 * i}),
                  json.dumps({"step": s, "autoencoder/usage": 0.45 + 0.1 * i})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_verdict_uses_two_percent_of_the_last_value():
    assert convergence([_curve(0, [30.0, 10.38, 10.19]), _curve(1, [10.2, 10.1])])[0] == "plateaued"  # 1.9%, 1.0%
    status, text = convergence([_curve(0, [10.38, 10.19]), _curve(1, [10.31, 10.1])])  # seed 1 fell 2.1%
    assert status == "still improving"
    assert text == "still improving (rFD fell 2.1% over the last checkpoint interval, seed 1, steps 1000→2000)"
    assert convergence([_curve(0, [10.0, 10.0]), _curve(1, [10.38, 10.19])]) == (
        "plateaued", "plateaued (rFD changed at most 1.9% over the last checkpoint interval, 2 seeds, last step 2000)")
    assert convergence([_curve(0, [10.0, 10.5])]) == (
        "not settled", "not settled (rFD rose 4.8% over the last checkpoint interval, seed 0, steps 1000→2000)")
    assert convergence([_curve(0, [10.0, 10.0]), _curve(1, [9.0])])[0] == "too few checkpoints"
    assert convergence([SeedCurve(0, None), SeedCurve(1, "tokenizers/x")])[0] == "no validation curve"


def test_runs_without_val_records_are_read_from_their_log(tmp_path):
    lines = [{"step": 1, "autoencoder/usage": 0.3}, {"step": 2, "val/psnr": 18.0, f"val/{RFD}": 40.0},
             {"step": 3, "autoencoder/usage": 0.5}, {"step": 4, "val/psnr": 19.0, f"val/{RFD}": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
    curve = read_run(tmp_path, 0, "tokenizers/x")
    assert curve.rfd_name == RFD and curve.val["rfd"] == [(2, 40.0), (4, 30.0)]
    assert curve.val["psnr"] == [(2, 18.0), (4, 19.0)] and curve.train_usage == [(1, 0.3), (3, 0.5)]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two tokenizers x two tokenizer seeds: "baseline" plateaued, "CRT" still improving; a third
    tokenizer's runs recorded no validation."""
    toks = VERDICT_TOKENIZERS
    rows = make_rows(tokenizers=toks, sizes={"small": 2_000_000}, steps=[500, 1000, 2000], tokenizer_seeds=[0, 1])
    d = write_results(tmp_path_factory.mktemp("curves"), rows, grids=False)
    _write_run(d / "tokenizers" / "base", [60.0, 20.0, 12.0, 11.9])
    _write_run(d / "tokenizers" / "base-s1", [55.0, 21.0, 12.5, 12.4])
    _write_run(d / "tokenizers" / "crt", [60.0, 30.0, 24.0, 20.0])  # fell 20% of the last value
    _write_run(d / "tokenizers" / "crt-s1", [58.0, 31.0, 23.0, 22.0])
    return d, build_report(d, n_boot=0)


def test_report_shows_each_tokenizers_curves_and_verdict(study):
    d, paths = study
    page, summary = paths["html"].read_text(), paths["summary"].read_text()
    start = page.index('<section id="curves">')
    section = page[start:page.index("</section>", start)]
    assert page.index('<section id="figures">') < page.index('<section id="curves">') < page.index('id="protocol"')
    assert "<h2>Tokenizer training curves</h2>" in section and "less than 2% of the last value" in section
    assert "baseline: plateaued (rFD changed at most 0.8% over the last checkpoint interval, 2 seeds, last step 4000)" \
        in section
    crt = "CRT: still improving (rFD fell 20.0% over the last checkpoint interval, seed 0, steps 3000→4000)"
    assert crt in section
    assert "<td>twin</td><td>2</td><td>0</td>" in section and "no validation curve (no RUN/val records" in section
    # one figure per tokenizer with a curve, written next to the report and embedded in it
    figures = {k: v for k, v in paths.items() if k.startswith("figure:training curves")}
    assert set(figures) == {"figure:training curves baseline", "figure:training curves CRT"}
    for path in figures.values():
        assert path.parent == d / "report" and path.is_file()
        assert base64.b64encode(path.read_bytes()).decode() in section
    assert section.count("<img") == 2
    # the same verdicts in summary.md and fits.json; a tokenizer still improving is also a warning
    assert f"- {crt}" in summary and "- twin: no validation curve" in summary
    fits = json.loads(paths["fits"].read_text())
    status = {c["label"]: c["status"] for c in fits["tokenizer_curves"]}
    assert status == {"baseline": "plateaued", "CRT": "still improving", "twin": "no validation curve"}
    base = next(c for c in fits["tokenizer_curves"] if c["label"] == "baseline")
    assert base["last"]["1"]["rfd"] == {"step": 4000, "value": 12.4}
    assert any(w.startswith("tokenizer CRT was still improving") for w in fits["warnings"])


def test_curves_report_is_deterministic(study, tmp_path):
    d, paths = study
    again = build_report(d, tmp_path / "again", n_boot=0)
    for key, p in paths.items():
        assert again[key].read_bytes() == p.read_bytes(), key
