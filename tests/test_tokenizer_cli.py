"""End to end on CPU: train a tiny tokenizer through the engine, load it, encode a cache, reconstruct."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
import yaml

from twostage import cli
from twostage.engine.run_files import RunLoadError
from twostage.tokenizers.vq.tokenizer import VQTokenizer


# TWOSTAGE_TEST_DEVICE=cuda runs the training part of this test on a GPU (bf16 autocast).
DEVICE = os.environ.get("TWOSTAGE_TEST_DEVICE", "cpu")


def run_cli(*argv) -> int:
    return cli.main(["tokenizer", *map(str, argv)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8)  # grayscale, 16x16
    np.savez(tmp / "data.npz", images=images, labels=np.arange(12) % 3)
    cfg = {
        "data": {"name": "npz", "root": str(tmp / "data.npz"), "image_size": 16, "val_fraction": 0.25},
        "model": {"base_channels": 8, "channel_mult": [1, 2, 2], "enc_res_blocks": 1, "dec_res_blocks": 1,
                  "z_channels": 8, "norm_groups": 4, "codebook_size": 32, "code_dim": 4},
        "loss": {"perceptual": "none", "disc_channels": 8, "disc_layers": 2, "disc_start": 2},
        "crt": {"enabled": True, "width": 32, "heads": 2, "ramp_steps": 2},
        "monitor": {"grid_images": 4},
        "train": {"steps": 4, "batch_size": 4, "ckpt_every": 2, "log_every": 2, "num_workers": 0,
                  "ema_decay": 0.9, "device": DEVICE, "progress": False},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "run"
    assert run_cli("train", tmp / "tiny.yaml", "optim.ae.lr=1e-3", "--out", out) == 0
    return out


def test_train_writes_a_run(run):
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    assert (run / "samples" / "recon_0000004.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*(r.keys() for r in rows))
    for key in ("autoencoder/crt", "autoencoder/usage", "autoencoder/perplexity", "discriminator/d",
                "perf/step_time_s"):
        assert any(k.endswith(key) for k in keys), key


def test_from_pretrained_uses_ema_and_checksums_it(run):
    tok = VQTokenizer.from_pretrained(run)
    weights = run / "checkpoints" / "step_0000004" / "ema.safetensors"
    assert tok.weights_path == weights and tok.step == 4
    assert tok.checksum == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert tok.codebook_size == 32 and tok.grid_size(16) == (4, 4) and tok.grid_size() == (4, 4)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.int64
    images = tok.decode(ids)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    torch.testing.assert_close(tok.reconstruct(x), images)
    torch.testing.assert_close(tok.decode(ids.flatten(1)), images)
    raw = VQTokenizer.from_pretrained(run, weights="raw", step=2)
    assert raw.weights_path.name == "model.safetensors" and raw.step == 2
    with pytest.raises(RunLoadError, match="step 3"):
        VQTokenizer.from_pretrained(run, step=3)


def test_encode_cache_and_reconstruct(run, tmp_path):
    from twostage.data import build_dataset
    from twostage.data.token_cache import CacheDataset, read_meta

    cache = tmp_path / "cache"
    assert run_cli("encode", run, "--split", "val", "--out", cache, "--batch-size", 2, "--num-workers", 0,
                   "--device", "cpu") == 0
    tokens = np.load(cache / "tokens.npy", mmap_mode="r")
    assert tokens.shape == (3, 2, 16) and tokens.dtype == np.uint16
    meta = read_meta(cache)
    tok = VQTokenizer.from_pretrained(run)
    assert meta.grid == (4, 4) and meta.codebook_size == 32 and meta.tokenizer_checksum == tok.checksum
    assert meta.num_classes == 3 and meta.split == "val"
    ds = build_dataset(tok.config.data, "val")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert np.array_equal(tokens[:, 0], tok.encode(x).flatten(1).numpy())
    assert np.array_equal(tokens[:, 1], tok.encode(x.flip(-1)).flatten(1).numpy())
    assert np.array_equal(np.load(cache / "labels.npy"), [ds[i][1] for i in range(len(ds))])
    assert len(CacheDataset(cache)) == 3
    assert run_cli("encode", run, "--split", "val", "--out", cache, "--device", "cpu") == 1  # exists
    png = tmp_path / "grid.png"
    assert run_cli("reconstruct", run, "--out", png, "--num", 3, "--num-workers", 0, "--device", "cpu") == 0
    from PIL import Image

    assert Image.open(png).size[0] > 16
