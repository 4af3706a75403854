"""Pretrained tokenizers in a study (`tokenizers: - {run: PATH}`): validation, plan, and a tiny CPU study
that encodes and evaluates a finished run folder beside a tokenizer it trains, without writing into it."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file, save_file

from test_faults_support import npz_splits
from test_study_run import TINY_VQ, TRAIN, tiny_spec
from twostage import cli
from twostage.common.hashing import file_sha256
from twostage.config import ConfigError
from twostage.study.jobs import generator_id, job_done, tokenizer_id
from twostage.study.plan import build_plan
from twostage.study.pretrained import weights_file
from twostage.study.runner import run_study
from twostage.study.spec import load_spec
from twostage.study.table import read_table


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return npz_splits(tmp_path_factory.mktemp("study_data"), train=32, val=12)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished tiny VQ run folder, trained on *other* data (16 train images) than the study's (32)."""
    root = tmp_path_factory.mktemp("pretrained")
    other = npz_splits(root / "other_data", train=16, val=8)
    run = root / "tiny_vq"
    argv = ["tokenizer", "train", "vq_fmnist_f4", *TINY_VQ, *[f"train.{k}={v}" for k, v in TRAIN.items()],
            "train.steps=2", "data.name=npz", f"data.root={other}", "data.image_size=16", "--out", str(run)]
    assert cli.main(argv) == 0
    return run


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "cache"))


def spec_with_run(data, run, **extra) -> dict:
    spec = tiny_spec(data)
    spec["tokenizers"] = [{"preset": "vq_fmnist_f4", "label": "trained"}, {"run": str(run), "label": "pre", **extra}]
    spec["budgets"] = [2]
    return spec


def snapshot(folder) -> dict[str, str]:
    """Every entry of a folder (files by content hash): what 'never written into' means."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_spec_validation_one_line_errors(data, pretrained, tmp_path):
    cases = [
        ({"preset": "vq_fmnist_f4", "run": str(pretrained)}, r"tokenizers\[1\]: give either `preset`.*not both"),
        ({"label": "x"}, r"tokenizers\[1\]: give either `preset`.*one of them"),
        ({"run": str(tmp_path / "missing")}, r"tokenizers\[1\]\.run: run folder .*missing' does not exist"),
        ({"run": str(tmp_path)}, r"is not a run folder \(it has no config.yaml\)"),
        ({"run": str(pretrained), "overrides": ["crt.enabled=true"]}, r"a pretrained run is used as it is"),
    ]
    generator = tmp_path / "gen_run"
    generator.mkdir()
    (generator / "config.yaml").write_text("kind: ar\n")
    cases.append(({"run": str(generator)}, r"is not a tokenizer run \(its config.yaml has kind='ar'"))
    for entry, message in cases:
        spec = tiny_spec(data)
        spec["tokenizers"] = [{"preset": "vq_fmnist_f4"}, entry]
        with pytest.raises(ConfigError, match=message) as err:
            load_spec(spec)
        assert "\n" not in str(err.value)
    # a run folder without a checkpoint: refused when the grid is resolved, before any work
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pretrained / "config.yaml", bare / "config.yaml")
    with pytest.raises(ConfigError, match=r"tokenizers\[1\] \(run .*bare\): .*has no checkpoint"):
        build_plan(load_spec(spec_with_run(data, bare)), tmp_path / "study")


def test_plan_has_no_train_stage_one_seed_and_an_id_of_the_weights(data, pretrained, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(pretrained, run, symlinks=True)
    spec = spec_with_run(data, run)
    spec["seeds"] = {"tokenizer": [5, 6], "generator": [5, 6], "design": "paired"}
    plan = build_plan(load_spec(spec), tmp_path / "study")
    trained = [t for t in plan.tokenizers if not t.pretrained]
    pre = [t for t in plan.tokenizers if t.pretrained]
    assert [t.seed for t in trained] == [5, 6] and [t.seed for t in pre] == [5]  # one run: the first seed
    assert [g.seed for g in plan.generators if g.tokenizer.pretrained] == [5]  # paired with the first generator seed
    job = plan.tokenizer_jobs[plan.tokenizers.index(pre[0])]
    assert [s.name for s in job.stages] == ["link", "encode_train", "encode_val", "recon"]
    assert "tokenizer seed 5 only" in job.label and str(run) in job.label
    view = plan.root / "tokenizers" / tokenizer_id(pre[0]) / "run"
    assert job.stages[0].argv[:3] == ["study", "link-run", str(run)] and f"data.root={json.dumps(str(data))}" in \
        job.stages[0].argv
    assert all(str(view) in s.argv for s in job.stages[1:])  # encode and eval read the view, not the run
    # the same config trained by the study is another tokenizer, another cell
    assert pre[0].config.model == trained[0].config.model
    assert tokenizer_id(pre[0]) != tokenizer_id(trained[0])

    before = {j.id for j in plan.jobs}
    trained_ids = {j.id for j in plan.jobs if j.id not in {job.id, *[g.id for g, t in zip(plan.generator_jobs, plan.generators) if t.tokenizer.pretrained]}}
    weights = weights_file(run)
    state = load_file(str(weights))
    key = next(iter(state))
    state[key] = state[key] + 1.0
    save_file(state, str(weights))
    again = build_plan(load_spec(spec), tmp_path / "study")
    pre2 = next(t for t in again.tokenizers if t.pretrained)
    assert tokenizer_id(pre2) != tokenizer_id(pre[0])  # new weights: a new tokenizer job ...
    pre_gens = [generator_id(g, load_spec(spec)) for g in again.generators if g.tokenizer.pretrained]
    assert not set(f"gen-{g}" for g in pre_gens) & before  # ... and new generator runs on its cache
    assert trained_ids <= {j.id for j in again.jobs}  # the trained tokenizer's jobs are untouched


def test_tiny_study_with_a_pretrained_run_beside_a_trained_tokenizer(data, pretrained, tmp_path):
    before = snapshot(pretrained)
    spec = load_spec(spec_with_run(data, pretrained))
    plan = run_study(spec, tmp_path / "study", gpus=0)
    assert all(job_done(j, plan.root) for j in plan.jobs)
    assert snapshot(pretrained) == before  # nothing written into the given run folder

    pre = next(t for t in plan.tokenizers if t.pretrained)
    tid = tokenizer_id(pre)
    meta = json.loads((plan.root / "caches" / f"{tid}_train" / "meta.json").read_text())
    # encoded with the study's data section (its 32 train images, limit 24), not the run's own (16 images),
    # by the given run's weights
    assert meta["extra"]["data"]["root"] == str(data)
    assert np.load(plan.root / "caches" / f"{tid}_train" / "tokens.npy", mmap_mode="r").shape[0] == 24
    assert meta["tokenizer_checksum"] == pre.weights_sha256 == file_sha256(weights_file(pretrained))
    assert (plan.root / "tokenizers" / tid / "eval" / "recon.json").is_file()

    rows = read_table(plan.root).to_pylist()
    by_label = {r["tokenizer_label"]: r for r in rows}
    assert set(by_label) == {"trained", "pre"}
    a, b = by_label["trained"], by_label["pre"]
    assert b["tokenizer_run"] == str(pretrained) and a["tokenizer_run"] == f"tokenizers/{tokenizer_id(plan.tokenizers[0])}"
    assert (b["tokenizer_kind"], b["tokens_per_image"], b["codebook_size"]) == ("vq", 16, 32)
    assert (a["tokenizer_kind"], a["tokens_per_image"], a["codebook_size"]) == ("vq", 16, 32)
    assert a["tokenizer_cell"] != b["tokenizer_cell"] and b["tokenizer_seed"] == 0
    assert b["psnr"] is not None and b["gfd"] is not None


def test_an_exported_folder_is_a_pretrained_entry_too(data, pretrained, tmp_path):
    """`twostage export` output (config.json + model.safetensors) works as a `run:` entry: its view is an
    export with the study's data keys, read by the loaders like the run it came from."""
    import torch

    from twostage import api
    from twostage.engine.run_files import is_pretrained
    from twostage.study.pretrained import link_run

    export = api.save_pretrained(pretrained, tmp_path / "export")
    plan = build_plan(load_spec(spec_with_run(data, export)), tmp_path / "study")
    assert len({tokenizer_id(t) for t in plan.tokenizers}) == 2 and weights_file(export) == export / "model.safetensors"
    before = snapshot(export)
    view = link_run(export, tmp_path / "view", [f"data.root={data}"])
    assert is_pretrained(view) and json.loads((view / "config.json").read_text())["data"]["root"] == str(data)
    a, b = api.load_tokenizer(pretrained), api.load_tokenizer(view)
    for key, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[key]), key
    assert snapshot(export) == before
