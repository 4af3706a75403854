"""End to end on CPU through the CLI: the rae_fmnist preset (real frozen EfficientNet-Lite0 encoder, tiny ViT
decoder, GAN on) trains a few steps, encodes a latents cache and reconstructs; a DiT trains on that cache as on
KL latents and samples through the RAE decoder. (`eval recon` takes any run through load_tokenizer; it is left
out here because its 1280-d Frechet distance alone costs seconds on a CPU.)"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twostage import cli
from twostage import config as configlib
from twostage.data.token_cache import CacheDataset
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.run import sample_run
from twostage.generators.training import train_run
from twostage.registry import generator_for, run_kind
from twostage.tokenizers.base import load_tokenizer

TRAIN = ["train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0",
         "train.device=cpu", "train.progress=false", "train.ema_decay=0.9", "monitor.grid_images=4"]


@pytest.fixture(scope="module")
def rae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rae")
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", images=rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8),
             labels=np.arange(12) % 3)
    run = tmp / "rae"
    overrides = ["data.name=npz", f"data.root={tmp / 'data.npz'}", "data.image_size=16", "data.val_fraction=0.25",
                 "model.decoder.width=32", "model.decoder.depth=1", "model.decoder.heads=2", "norm.images=6",
                 "loss.perceptual_size=32", "loss.gan_weight=0.75", "loss.disc_start=1", "loss.disc_channels=8",
                 *TRAIN]  # fmt: skip
    assert cli.main(["tokenizer", "train", "rae_fmnist", *overrides, "--out", str(run)]) == 0
    return run


def test_rae_preset_trains_encodes_and_reconstructs_and_a_dit_trains_on_it(rae_run, capsys):
    run, root = rae_run, rae_run.parent
    assert run_kind("tokenizer", run).name == "rae" and generator_for("rae").name == "dit"
    stats = json.loads((run / "latent_stats.json").read_text())
    assert stats["images"] == 6 and stats["encoder"] == "EffNetLite0" and len(stats["std"]) == 40
    keys = set(load_file(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert any(k.startswith("disc.") for k in keys) and not any("encoder" in k for k in keys)  # no encoder copy
    assert (run / "samples" / "recon_0000002.png").is_file()

    tok = load_tokenizer(run)
    assert tok.kind == "rae" and tok.grid_size() == (4, 4) and tok.latent_channels == 40
    assert int(tok.model.latent_stats_images) == 6

    train_cache, val_cache = root / "cache_train", root / "cache_val"
    for split, out in (("train", train_cache), ("val", val_cache)):
        assert cli.main(["tokenizer", "encode", str(run), "--split", split, "--out", str(out), "--device", "cpu",
                         "--num-workers", "0"]) == 0
    data = CacheDataset(train_cache)
    meta = data.meta
    assert meta.kind == "latents" and meta.channels == 40 and meta.grid == (4, 4) and len(data) == 9
    assert meta.tokenizer_checksum == tok.checksum and data.variants == 2
    latents = np.load(train_cache / "latents.npy").astype(np.float64)  # (N, V, C, h, w), normalized
    # the run's statistics came from the first 6 of these 9 training images: normalized, they are ~N(0, 1)
    assert np.abs(latents[:6, 0].mean(axis=(0, 2, 3))).max() < 0.01
    assert np.abs(latents[:6, 0].std(axis=(0, 2, 3)) - 1).max() < 0.01
    images = torch.from_numpy(np.load(root / "data.npz")["images"][:2]).float()[:, None] / 127.5 - 1
    z = tok.encode(images)
    assert torch.allclose(torch.from_numpy(latents[:2, 0]).float(), z, atol=2e-2)  # float16 cache
    assert torch.allclose(tok.decode(z), tok.reconstruct(images), atol=1e-5)  # inference: no noise

    assert cli.main(["tokenizer", "reconstruct", str(run), "--out", str(root / "r.png"), "--num", "4",
                     "--device", "cpu", "--num-workers", "0"]) == 0
    assert (root / "r.png").is_file()
    # the DiT trains on the RAE latents exactly as on KL-VAE latents, and samples through the RAE decoder
    cfg = configlib.load(DiTRunConfig, "dit_fmnist", [
        "model.size=tiny", "train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1",
        "train.num_workers=0", "train.device=cpu", "train.progress=false", "sample.grid_at_checkpoint=0",
        "val.batch_size=3"])  # fmt: skip
    dit = root / "dit"
    last = train_run(cfg, train_cache, dit, val_cache=val_cache)
    assert np.isfinite(last["flow/loss"]) and "val/loss" in last
    info = json.loads((dit / "model.json").read_text())
    assert info["channels"] == 40 and info["grid"] == [4, 4]
    samples = sample_run(dit, 3, root / "s.npz", steps=2, batch_size=3, grid=0, device="cpu")
    with np.load(samples) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8
    capsys.readouterr()


def test_a_missing_dinov2_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    assert cli.main(["tokenizer", "train", "rae_fmnist", "model.encoder.network=dinov2",
                     f"model.encoder.weights={missing}", *TRAIN, "--out", str(tmp_path / "run")]) in (1, 2)
    err = capsys.readouterr().err
    assert str(missing) in err and "model.encoder.weights" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
