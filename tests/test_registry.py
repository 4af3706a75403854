"""The registry of kinds (twostage/registry.py): lookups, errors, that nothing else branches on a kind's
name, and that a new kind registered from outside the package runs through the CLI and a tiny study."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import toy_kind
from test_faults_support import npz_splits
from twostage import cli, registry
from twostage.config import ConfigError
from twostage.study.runner import run_study
from twostage.study.spec import load_spec
from twostage.study.table import read_table

PACKAGE = Path(__file__).resolve().parent.parent / "twostage"


def test_lookups_pair_tokenizers_with_the_generator_of_their_cache():
    assert registry.generator_for("vq").name == "ar" and registry.generator_for("kl").name == "dit"
    assert registry.default_kind("tokenizer") == "vq" and registry.default_kind("generator") == "ar"
    with pytest.raises(ConfigError, match="not a tokenizer kind; did you mean 'vq'.*Known tokenizer kinds: vq"):
        registry.tokenizer_kind("vqq")
    assert registry.source_kind("tokenizer", {"kind": "kl"}, ["kind=vq"]) == "vq"  # an override wins


def test_nothing_outside_the_registry_branches_on_a_kind_name():
    pattern = re.compile(r"kind ==|is_kl_run|GENERATOR_FOR")
    hits = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}"
            for path in PACKAGE.rglob("*.py") if path.name != "registry.py"
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "kind dispatch belongs in twostage/registry.py:\n" + "\n".join(hits)


@pytest.fixture
def pool_kind():
    toy_kind.register()  # its parts are imported as "toy_kind:..." (pytest puts tests/ on sys.path)
    yield
    toy_kind.unregister()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return npz_splits(tmp_path_factory.mktemp("pool_data"), train=24, val=8)


TRAIN = {"steps": 3, "batch_size": 4, "ckpt_every": 3, "log_every": 1, "num_workers": 0, "device": "cpu",
         "progress": False}


def test_a_new_kind_is_one_module_and_one_registry_entry(pool_kind, data, tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "cache"))
    preset = tmp_path / "pool.yaml"
    preset.write_text(yaml.safe_dump({"kind": "pool", "data": {"name": "npz", "root": str(data), "image_size": 16},
                                      "model": {"factor": 4, "levels": 8}, "train": TRAIN}))
    # the CLI: train, encode, reconstruct
    run = tmp_path / "run"
    assert cli.main(["tokenizer", "train", str(preset), "--out", str(run)]) == 0
    assert cli.main(["tokenizer", "encode", str(run), "--split", "val", "--out", str(tmp_path / "c"),
                     "--device", "cpu", "--num-workers", "0"]) == 0
    assert cli.main(["tokenizer", "reconstruct", str(run), "--out", str(tmp_path / "r.png"), "--num", "4",
                     "--device", "cpu", "--num-workers", "0"]) == 0
    # a study: the pool tokenizer's token cache pairs it with the AR generator, through the registry
    spec = load_spec({
        "name": "pool", "data": {"name": "npz", "root": str(data), "image_size": 16},
        "tokenizer": {"steps": 3, "encode_batch_size": 8, "num_workers": 0},
        "tokenizers": [{"preset": str(preset)}],
        "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"], "overrides": [
            *[f"train.{k}={v}" for k, v in TRAIN.items() if k != "steps"], "val.batch_size=4",
            "sample.grid_at_checkpoint=0"]}},
        "budgets": [2],
        "sample": {"num": 8, "batch_size": 8},
        "eval": {"reference": f"npz:{data}:val", "reference_max_images": 8, "batch_size": 8, "recon_max_images": 4,
                 "recon_perceptual": False},
    })
    run_study(spec, tmp_path / "study", gpus=0)
    rows = read_table(tmp_path / "study").to_pylist()
    assert len(rows) == 1 and rows[0]["tokenizer_kind"] == "pool" and rows[0]["tokenizer_label"] == "pool f4 L8"
    assert rows[0]["codebook_size"] == 8 and rows[0]["tokens_per_image"] == 16 and rows[0]["gfd"] > 0
