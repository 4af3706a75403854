"""AR training through the shared engine and the `generator` commands, on tiny random token caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twostage import config as configlib
from twostage.data.cache_writer import write_arrays
from twostage.data.token_cache import CacheDataset, CacheMeta
from twostage.engine.task import PhaseContext
from twostage.cli import main
from twostage.generators.ar.config import ARRunConfig
from twostage.generators.ar.task import ARTask, validation_loss

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
    write_arrays(folder, meta, np.stack([plain, flipped], axis=1), labels)
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
    """Decodes codes to flat gray 12x12 images (value = code / vocab), like a VQ tokenizer's decode."""

    checksum = "abc"

    def decode(self, indices):
        x = indices.float() / VOCAB * 2 - 1
        return x.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]


def stand_in_loader(run, device="cpu", step=None, weights="auto"):
    return StandInTokenizer()


def test_checkpoint_side_work_writes_validation_and_a_grid(tmp_path):
    # The RNG the side work draws from is isolated by the engine (twostage.engine.trainer.isolated_rng).
    data = CacheDataset(make_cache(tmp_path / "c"))

    def factory(device):
        torch.randn(100)
        return StandInTokenizer().decode

    task = ARTask(tiny_config(), data.meta, val_data=data, decoder=factory)
    logs = task.on_checkpoint(5, tmp_path / "run", task.modules)
    assert (tmp_path / "run" / "samples" / "step_0000005.png").is_file() and "val/loss" in logs
    record = json.loads((tmp_path / "run" / "val" / "step_0000005.json").read_text())
    assert record["step"] == 5 and record["loss"] == logs["val/loss"] and len(record["per_position"]) == 9


def test_train_and_sample_through_the_commands(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")

    train, val, run = make_cache(tmp_path / "train"), make_cache(tmp_path / "val", n=10, seed=1, split="val"), tmp_path / "run"
    monkeypatch.setattr("twostage.tokenizers.base.load_tokenizer", stand_in_loader)
    overrides = ["train.steps=6", "train.batch_size=8", "train.num_workers=0", "train.progress=false",
                 "train.log_every=2", "train.ckpt_every=3", "train.device=cpu", "train.ema_decay=0.9",
                 "val.batch_size=4", "sample.grid_at_checkpoint=4"]
    assert main(["generator", "train", "ar_fmnist_tiny", *overrides, "--tokens", str(train),
                 "--val-tokens", str(val), "--out", str(run)]) == 0
    info = json.loads((run / "model.json").read_text())
    assert info["kind"] == "ar" and info["grid"] == [3, 3] and info["vocab_size"] == VOCAB
    assert info["num_classes"] == CLASSES and info["tokens_per_image"] == 9 and info["tokenizer_checksum"] == "abc"
    assert info["train_flops_per_step"] == info["train_flops_per_token"] * 9 * 8
    assert info["non_embedding_parameters"] < info["parameters"]
    val_json = json.loads((run / "val" / "step_0000006.json").read_text())
    assert len(val_json["per_position"]) == 9 and val_json["weights"] == "ema" and val_json["step"] == 6
    assert val_json["train_flops"] == 6 * info["train_flops_per_step"]
    assert (run / "samples" / "step_0000006.png").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in x for x in lines) and any("ar/loss" in x for x in lines)

    out = tmp_path / "s.npz"
    assert main(["generator", "sample", str(run), "--num", "7", "--cfg", "2.0", "--batch-size", "4",
                 "--out", str(out), "--top-k", "8", "--device", "cpu"]) == 0
    with np.load(out) as z:
        assert z["arr_0"].shape == (7, 12, 12, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 0, 0, 1, 1, 2, 2] and z["tokens"].shape == (7, 3, 3)
        # the images are the stand-in decoding of the saved tokens
        assert np.array_equal(z["arr_0"][:, ::4, ::4, 0], np.round((z["tokens"] / VOCAB * 2 - 1 + 1) * 127.5))
        proto = json.loads(str(z["protocol"]))
    assert proto["cfg_scale"] == 2.0 and proto["label_sampling"] == "balanced" and proto["top_k"] == 8
    assert out.with_suffix(".png").is_file() and out.with_suffix(".json").is_file()
    # same seed, same tokens; tokens only needs no tokenizer
    monkeypatch.undo()
    again = tmp_path / "t.npz"
    assert main(["generator", "sample", str(run), "--num", "7", "--cfg", "2.0", "--batch-size", "4",
                 "--out", str(again), "--top-k", "8", "--tokens-only", "--device", "cpu"]) == 0
    with np.load(out) as a, np.load(again) as b:
        assert np.array_equal(a["tokens"], b["tokens"]) and b["arr_0"].shape[0] == 0
    # no --cfg: the run's sample.cfg_scale (2.0 in the preset); --cfg 1: no guidance
    default, plain = tmp_path / "d.npz", tmp_path / "p.npz"
    for path, extra in ((default, []), (plain, ["--cfg", "1"])):
        assert main(["generator", "sample", str(run), "--num", "2", "--out", str(path), "--tokens-only",
                     "--device", "cpu", *extra]) == 0
    assert json.loads(default.with_suffix(".json").read_text())["protocol"]["cfg_scale"] == 2.0
    assert json.loads(plain.with_suffix(".json").read_text())["protocol"]["cfg_scale"] == 1.0


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["generator", "sample", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x.npz")]) == 1
    assert "no config.yaml" in capsys.readouterr().err
    meta = CacheMeta(kind="latents", grid=(2, 2), num_classes=2, tokenizer_run="", tokenizer_checksum="", split="train",
                     channels=4)
    write_arrays(tmp_path / "lat", meta, np.zeros((2, 1, 4, 2, 2)), np.zeros(2))
    assert main(["generator", "train", "ar_fmnist_tiny", "--tokens", str(tmp_path / "lat"), "--out",
                 str(tmp_path / "r")]) == 2
    assert "discrete token cache" in capsys.readouterr().err
    assert main(["generator", "train", "ar_fmnist_tiny", "kind=gan", "--tokens", "x", "--out", "y"]) == 2
    assert "not a generator kind" in capsys.readouterr().err


@pytest.mark.parametrize("kind,flag,taker", [("ar", ["--steps", "10"], "dit"), ("dit", ["--top-k", "5"], "ar"),
                                             ("dit", ["--tokens-only"], "ar")])
def test_sampling_options_of_another_kind_are_refused(tmp_path, capsys, kind, flag, taker):
    (tmp_path / "config.yaml").write_text(f"kind: {kind}\n")
    assert main(["generator", "sample", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x.npz"), *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} is an option of {taker} generator runs" in err and f"is a {kind} run" in err


def test_the_samples_grid_shows_every_class():
    from twostage.generators.outputs import balanced_labels, grid_by_class

    labels = balanced_labels(50, 10)  # grouped by class, as samples files store them
    rows, per_row = grid_by_class(labels, 64)
    assert per_row == 5 and len(rows) == 50  # 5 per class exist: a full row of 5 for each of the 10 classes
    assert sorted(set(labels[rows].tolist())) == list(range(10))
    rows, per_row = grid_by_class(balanced_labels(1000, 10), 64)
    assert per_row == 6 and len(rows) == 60 and np.bincount(balanced_labels(1000, 10)[rows]).tolist() == [6] * 10
