"""`twostage export` / save_pretrained: one step's weights as config.json + model.safetensors, which every
loader reads like the run folder (issue: published checkpoints and the field's formats, item 4)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_faults_support import AR_TRAIN, encode, make_npz, token_cache, train_tokenizer  # noqa: E402

from twostage import api, cli  # noqa: E402
from twostage.common.errors import UserError  # noqa: E402
from twostage.engine.run_files import RunLoadError, is_pretrained, load_run_weights  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = make_npz(tmp / "data", n=12)
    vq = train_tokenizer("vq", data, tmp / "vq", steps=2)
    cache = token_cache(tmp / "cache")
    cfg = api.load_config("ar_fmnist_tiny", AR_TRAIN)
    api.train_generator(cfg, cache, tmp / "ar")
    return tmp, vq, tmp / "ar"


def test_an_exported_tokenizer_loads_and_encodes_like_its_run(runs, tmp_path):
    tmp, vq, _ = runs
    assert cli.main(["export", str(vq), "--out", str(tmp_path / "vq")]) == 0
    out = tmp_path / "vq"
    assert is_pretrained(out) and {"config.json", "model.safetensors", "pretrained.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "pretrained.json").read_text())
    assert record["step"] == 2 and record["source"] == str(vq.resolve())
    a, b = api.load_tokenizer(vq), api.load_tokenizer(out)
    assert type(a) is type(b) and b.step == 2 and a.config == b.config
    for key, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[key]), key
    mine, theirs = encode(vq, "val", tmp_path / "c_run"), encode(out, "val", tmp_path / "c_export")
    arrays = sorted(p.name for p in Path(mine).glob("*.npy"))
    assert arrays and arrays == sorted(p.name for p in Path(theirs).glob("*.npy"))
    for name in arrays:  # the same codes, read through the exported folder
        np.testing.assert_array_equal(np.load(Path(mine) / name), np.load(Path(theirs) / name))


def test_an_exported_generator_samples_like_its_run(runs, tmp_path):
    _, _, ar = runs
    out = api.save_pretrained(ar, tmp_path / "ar", weights="raw", step=4)
    model, info = api.load_generator(out)
    raw = load_run_weights(ar, "gpt", weights="raw", step=4)
    assert info["step"] == 4 and json.loads((out / "pretrained.json").read_text())["weights"] == "raw"
    assert info["checksum"] == raw.checksum  # a byte copy: samples trace to the run's checkpoint file
    for key, t in raw.state.items():
        assert torch.equal(model.state_dict()[key].cpu(), t), key
    a = api.sample(ar, 6, tmp_path / "s_run.npz", weights="raw", step=4, tokens_only=True, device="cpu", seed=1)
    b = api.sample(out, 6, tmp_path / "s_export.npz", tokens_only=True, device="cpu", seed=1)
    with np.load(a) as x, np.load(b) as y:
        assert set(x.files) == set(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key])
    ema = api.save_pretrained(ar, tmp_path / "ar_ema")  # auto: EMA (the run keeps it), latest step
    assert json.loads((ema / "pretrained.json").read_text())["weights"] == "ema"
    # the folder holds one step and one kind of weights: asking for others names what it has
    with pytest.raises(RunLoadError, match="holds the weights of step 4 only"):
        api.load_generator(out, step=6)
    with pytest.raises(RunLoadError, match="holds the raw weights only"):
        api.load_generator(out, weights="ema")


def test_export_refuses_a_used_folder_and_missing_ema(runs, tmp_path, capsys):
    _, vq, _ = runs
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep")
    assert cli.main(["export", str(vq), "--out", str(used)]) != 0
    assert "not an empty folder" in capsys.readouterr().err and (used / "x").read_text() == "keep"
    with pytest.raises(UserError, match="no EMA weights"):
        api.save_pretrained(vq, tmp_path / "ema", weights="ema")
    assert not (tmp_path / "ema").exists()
