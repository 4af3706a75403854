"""AR training through the shared engine and the `generator` commands, on tiny random token caches."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from twostage import config as configlib
from twostage.data.token_cache import CacheDataset, CacheMeta, write_cache
from twostage.engine.task import PhaseContext
from twostage.generators import commands
from twostage.generators.ar.task import ARTask, validation_loss
from twostage.generators.ar.config import ARRunConfig

GRID, VOCAB, CLASSES = (3, 3), 16, 3


def make_cache(folder, n=24, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    # class-dependent tokens with a little noise, so that the model has something to learn
    base = (labels[:, None] * 5 + np.arange(9)[None]) % VOCAB
    plain = np.where(rng.random((n, 9)) < 0.1, rng.integers(0, VOCAB, (n, 9)), base)
    flipped = plain.reshape(n, 3, 3)[:, :, ::-1].reshape(n, 9)
    meta = CacheMeta(kind="tokens", grid=GRID, num_classes=CLASSES, tokenizer_run="/nonexistent/tokenizer",
                     tokenizer_checksum="abc", split=split, codebook_size=VOCAB, image_size=12)
    write_cache(folder, meta, labels, tokens=np.stack([plain, flipped], axis=1))
    return folder


def tiny_config(**train) -> ARRunConfig:
    return configlib.load(ARRunConfig, "ar_fmnist_tiny", [
        "train.batch_size=8", "train.num_workers=0", "train.progress=false", "train.log_every=2",
        "train.ckpt_every=3", "train.device=cpu", "val.batch_size=5", "sample.grid_at_checkpoint=4",
        *[f"train.{k}={v}" for k, v in train.items()],
    ])


def test_label_dropout_and_validation_per_position(tmp_path):
    data = CacheDataset(make_cache(tmp_path / "c"))
    cfg = configlib.load(ARRunConfig, "ar_fmnist_tiny", ["label_dropout=1.0"])
    task = ARTask(cfg, data.meta)
    seen = {}
    model = task.model

    def spy(tokens, labels, per_token_loss=False):
        seen["labels"] = labels
        return model.forward(tokens, labels, per_token_loss)

    tokens, labels = torch.stack([data[i][0] for i in range(4)]), torch.tensor([0, 1, 2, 1])
    loss, _ = task.loss(PhaseContext((tokens, labels), 0, {"gpt": spy}, {}, torch.device("cpu")))
    assert (seen["labels"] == CLASSES).all() and torch.isclose(loss, torch.log(torch.tensor(16.0)))
    torch.nn.init.normal_(model.head.weight, std=0.3)
    result = validation_loss(model, data, batch_size=7)
    model.eval()
    all_tokens = torch.stack([data[i][0] for i in range(len(data))])
    all_labels = torch.tensor([data[i][1] for i in range(len(data))])
    expected = model(all_tokens, all_labels, per_token_loss=True).mean(0)
    assert result["num_samples"] == 24 and len(result["per_position"]) == 9
    torch.testing.assert_close(torch.tensor(result["per_position"], dtype=torch.float64), expected.double(), rtol=1e-5, atol=1e-5)
    assert abs(result["loss"] - expected.mean().item()) < 1e-5


class StandInTokenizer:
    """Decodes codes to flat gray 12x12 images (value = code / vocab), like Tokenizer.decode_indices."""

    checksum = "abc"

    def decode_indices(self, indices):
        x = indices.float() / VOCAB * 2 - 1
        return x.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]


def _cli(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_and_sample_through_the_commands(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import twostage.generators.ar.run as ar_run
    import twostage.generators.outputs as outputs

    train, val, run = make_cache(tmp_path / "train"), make_cache(tmp_path / "val", n=10, seed=1, split="val"), tmp_path / "run"
    monkeypatch.setattr(outputs, "load_tokenizer", lambda run, device: StandInTokenizer())
    overrides = ["train.steps=6", "train.batch_size=8", "train.num_workers=0", "train.progress=false",
                 "train.log_every=2", "train.ckpt_every=3", "train.device=cpu", "train.ema_decay=0.9",
                 "val.batch_size=4", "sample.grid_at_checkpoint=4"]
    assert _cli(["generator", "train", "ar_fmnist_tiny", *overrides, "--tokens", str(train),
                 "--val-tokens", str(val), "--out", str(run)]) == 0
    info = json.loads((run / "model.json").read_text())
    assert info["grid"] == [3, 3] and info["vocab_size"] == VOCAB and info["num_classes"] == CLASSES
    assert info["flops_per_step_train"] == info["flops_per_token_train"] * 9 * 8
    assert info["parameters"]["non_embedding"] < info["parameters"]["total"]
    val_json = json.loads((run / "val" / "step_0000006.json").read_text())
    assert len(val_json["per_position"]) == 9 and val_json["weights"] == "ema"
    assert val_json["train_flops"] == 6 * info["flops_per_step_train"]
    assert (run / "samples" / "step_0000006.png").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in x for x in lines) and any("ar/loss" in x for x in lines)

    monkeypatch.setattr(ar_run, "load_tokenizer", lambda run, device: StandInTokenizer())
    out = tmp_path / "s.npz"
    assert _cli(["generator", "sample", str(run), "--num", "7", "--cfg", "2.0", "--batch-size", "4",
                 "--out", str(out), "--top-k", "8"]) == 0
    with np.load(out) as z:
        assert z["images"].shape == (7, 12, 12, 3) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [0, 0, 0, 1, 1, 2, 2] and z["tokens"].shape == (7, 3, 3)
        # the images are the stand-in decoding of the saved tokens
        assert np.array_equal(z["images"][:, ::4, ::4, 0], np.round((z["tokens"] / VOCAB * 2 - 1 + 1) * 127.5))
        proto = json.loads(str(z["protocol"]))
    assert proto["cfg_scale"] == 2.0 and proto["label_sampling"] == "balanced" and proto["top_k"] == 8
    assert out.with_suffix(".png").is_file() and out.with_suffix(".json").is_file()
    # same seed, same tokens; tokens only needs no tokenizer
    again = tmp_path / "t.npz"
    assert _cli(["generator", "sample", str(run), "--num", "7", "--cfg", "2.0", "--batch-size", "4",
                 "--out", str(again), "--top-k", "8", "--tokens-only"]) == 0
    with np.load(out) as a, np.load(again) as b:
        assert np.array_equal(a["tokens"], b["tokens"]) and b["images"].shape[0] == 0


def test_errors_name_the_problem(tmp_path, capsys):
    assert _cli(["generator", "sample", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x.npz")]) == 1
    assert "no config.yaml" in capsys.readouterr().err
    meta = CacheMeta(kind="latents", grid=(2, 2), num_classes=2, tokenizer_run="", tokenizer_checksum="", split="train",
                     channels=4)
    write_cache(tmp_path / "lat", meta, np.zeros(2), latents=np.zeros((2, 1, 4, 2, 2)))
    with pytest.raises(configlib.ConfigError, match="discrete token cache"):
        _cli(["generator", "train", "ar_fmnist_tiny", "--tokens", str(tmp_path / "lat"), "--out", str(tmp_path / "r")])
    with pytest.raises(configlib.ConfigError, match="not a generator kind"):
        _cli(["generator", "train", "ar_fmnist_tiny", "kind=gan", "--tokens", "x", "--out", "y"])


def test_dit_only_sampling_options_are_refused_for_ar_runs(tmp_path):
    (tmp_path / "config.yaml").write_text("kind: ar\n")
    with pytest.raises(configlib.ConfigError, match="DiT"):
        _cli(["generator", "sample", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x.npz"), "--steps", "10"])
