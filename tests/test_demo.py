"""`twostage demo`: its spec gives every tokenizer a fitted law and every cell an interval within the
CPU time it is sized for; the command runs the study as parallel jobs, then the report; end to end on
tiny data through the real CLI (parallel subprocess jobs, report with laws)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from test_faults_support import npz_splits
from twostage import cli
from twostage.study import commands
from twostage.study import runner as runner_mod
from twostage.study.plan import build_plan
from twostage.study.spec import load_spec

MIN_LAW_POINTS = 4  # twostage/study/fit.py: a law with L_min free needs 4 distinct compute values


def test_demo_spec_gives_every_tokenizer_a_law_and_every_cell_seeds(tmp_path):
    spec = load_spec(commands.DEMO_SPEC)
    plan = build_plan(spec, tmp_path)
    per_tok: dict[str, set] = {}
    seeds: dict[tuple, set] = {}
    for g in plan.generators:
        per_tok.setdefault(g.tokenizer.label, set()).add((g.size, g.budget))
        seeds.setdefault((g.tokenizer.label, g.size, g.budget), set()).add(g.seed)
    assert len(per_tok) == 2  # a trade-off needs two tokenizers ...
    assert len({t.tokens_per_image for t in plan.tokenizers}) == 2  # ... that compress differently
    for label, cells in per_tok.items():  # compute = steps x batch x tokens: distinct budgets, distinct C
        assert len({b for _, b in cells}) >= MIN_LAW_POINTS, label
    assert all(len(s) >= 2 for s in seeds.values())  # an interval needs 2 seeds
    assert spec.sample.num >= 10  # the IS-style score splits the samples in 10


def test_demo_spec_stays_within_its_cpu_budget(tmp_path):
    """What the 4 minutes on 2 CPU cores were measured with (benchmarks/bench_study.py); raising these
    is a decision, not an accident: generator training tokens, feature-network images, tokenizer steps."""
    spec = load_spec(commands.DEMO_SPEC)
    plan = build_plan(spec, tmp_path)
    train_tokens = sum(g.budget * g.config.train.batch_size * g.tokenizer.tokens_per_image for g in plan.generators)
    assert train_tokens <= 1.25 * 2 * 750 * 32 * (64 + 16)
    n_gen = len(plan.generators) * len(spec.seeds.eval)
    feature_images = (n_gen * spec.sample.num + spec.eval.reference_max_images
                      + 2 * len(plan.tokenizers) * spec.eval.recon_max_images)
    assert feature_images <= 1.25 * (16 * 100 + 500 + 2 * 2 * 100)
    assert n_gen <= 16  # each evaluation also costs a few fixed seconds (FD's eigendecompositions)
    assert spec.tokenizer.steps * len(plan.tokenizers) <= 300
    assert spec.tokenizer.num_workers == 0 and spec.eval.batch_size <= 16


def test_demo_jobs():
    assert commands.demo_jobs(1) == 1
    assert commands.demo_jobs(2) == 2
    assert commands.demo_jobs(64) == commands.DEMO_MAX_JOBS


def test_demo_runs_the_study_as_parallel_jobs_then_the_report(tmp_path, monkeypatch):
    calls = []

    def fake(argv, root):
        calls.append((argv, {k: os.environ.get(k) for k in commands.DEMO_MALLOC}))

    monkeypatch.setattr(runner_mod, "invoke", fake)
    monkeypatch.setattr(commands, "demo_jobs", lambda: 2)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # a user's setting wins
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    (run, env_run), (report, _) = calls
    assert run == ["study", "run", "study_demo", "--out", str(tmp_path / "d"), "--jobs-per-gpu", "2"]
    assert report == ["study", "report", str(tmp_path / "d"), "--bootstrap", "200", "--fit-points", "all"]
    assert env_run == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": "12345"}
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # set for the jobs only, then removed
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"


def test_demo_failure_is_one_line(tmp_path, monkeypatch, capsys):
    def fail(argv, root):
        raise runner_mod.StageError("exit code 1 from: twostage study run ...")

    monkeypatch.setattr(runner_mod, "invoke", fail)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 1
    assert capsys.readouterr().err.startswith("demo error: exit code 1")
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


# -- end to end, tiny ------------------------------------------------------------------------------

TRAIN = ["train.num_workers=0", "train.device=cpu", "train.progress=false", "train.log_every=1",
         "train.ckpt_every=1000"]
TINY_VQ = ["model.base_channels=8", "model.channel_mult=[1,2,2]", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
           "model.z_channels=8", "model.norm_groups=4", "model.codebook_size=32", "model.code_dim=4",
           "loss.perceptual=none", "loss.gan_weight=0", "monitor.grid_images=4", "train.batch_size=4"]


@pytest.mark.extended  # about 2 minutes on 2 cores: `pytest -m extended`
def test_demo_end_to_end_on_tiny_data_fits_a_law_per_tokenizer(tmp_path, monkeypatch):
    """The demo's path with a tiny spec: 2 tokenizers x 4 budgets as parallel subprocess jobs, then a
    report whose every series has a fitted law for both tokenizers and no 'not enough points'."""
    data = npz_splits(tmp_path / "data", train=32, val=16)
    spec = {
        "name": "demo-tiny", "data": {"name": "npz", "root": str(data), "image_size": 16},
        "tokenizer": {"steps": 2, "overrides": [*TINY_VQ, *TRAIN], "encode_batch_size": 16, "num_workers": 0},
        "tokenizers": [{"preset": "vq_fmnist_f4"},
                       {"preset": "vq_fmnist_f8", "overrides": ["model.channel_mult=[1,2,2,2]"]}],
        "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"], "cfg": 2.0, "overrides": [
            *TRAIN, "train.batch_size=8", "val.batch_size=8", "sample.grid_at_checkpoint=0"]}},
        "budgets": [4, 3, 2, 1],
        "sample": {"num": 12, "batch_size": 12},
        "eval": {"reference": f"npz:{data}:val", "reference_max_images": 12, "batch_size": 12, "recon_max_images": 8,
                 "recon_perceptual": False},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(commands, "DEMO_SPEC", str(path))
    monkeypatch.setattr(commands, "demo_jobs", lambda: 2)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert len(list((out / "logs").glob("*.log"))) == 11  # every job ran as a subprocess
    fits = json.loads((out / "report" / "fits.json").read_text())
    by_series: dict[str, list] = {}
    for f in fits["fits"]:
        by_series.setdefault((f["key"]["metric"], f["key"]["series"]), []).append(f)
    assert ("val_loss", "ar") in by_series and ("gfd", "FD-EffNetLite0") in by_series
    assert all(len(fs) == 2 for fs in by_series.values())  # every series: a law for both tokenizers
    assert all(f["status"] == "ok" and f["n_points"] == 4 and f["bootstrap_resamples"] == 200
               for fs in by_series.values() for f in fs)
    assert not any("not enough points" in w for w in fits["warnings"])
