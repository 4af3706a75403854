"""End to end on CPU: tiny KL-VAE (with the EffNet VF loss) -> latent cache with statistics -> tiny
LightningDiT through the engine -> samples file, as the study runs the continuous path."""

import json

import numpy as np
import pytest
import torch
import yaml

from twostage import config as configlib
from twostage.data.token_cache import CacheDataset
from twostage.cli import main
from twostage.engine.run_files import RunLoadError, recorded_kind
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.run import load_run, sample_noise, sample_run
from twostage.generators.training import train_run
from twostage.tokenizers.base import load_tokenizer
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.run import encode_run
from twostage.tokenizers.run import train_run as train_tokenizer


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kl")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8)  # grayscale 16x16, 3 classes
    np.savez(tmp / "data.npz", images=images, labels=np.arange(12) % 3)
    overrides = [
        "data.name=npz", f"data.root={tmp / 'data.npz'}", "data.image_size=16", "data.val_fraction=0.25",
        "model.spec=f4d4", "model.base_channels=8", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
        "model.norm_groups=4", "loss.perceptual=none", "loss.disc_channels=8", "loss.disc_layers=2",
        "loss.disc_start=1", "vf.enabled=true", "monitor.grid_images=4", "train.steps=2", "train.batch_size=4",
        "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0", "train.ema_decay=0.9",
        "train.device=cpu", "train.progress=false", "optim.ae.lr=1e-3",
    ]  # fmt: skip
    cfg = configlib.load(KLRunConfig, None, overrides)
    out = tmp / "kl"
    last = train_tokenizer(cfg, out)
    assert "autoencoder/vf" in last and "discriminator/d" in last
    return out


@pytest.fixture(scope="module")
def caches(kl_run):
    root = kl_run.parent
    train = encode_run(kl_run, "train", root / "cache_train", batch_size=5)
    val = encode_run(kl_run, "val", root / "cache_val", flip=False)
    return train, val


def test_kl_run_and_cache(kl_run, caches):
    assert recorded_kind(kl_run) == "kl" and (kl_run / "samples" / "recon_0000002.png").is_file()
    tok = load_tokenizer(kl_run)
    assert tok.weights_path.name == "ema.safetensors" and tok.grid_size() == (4, 4) and tok.latent_channels == 4
    train, val = caches
    data = CacheDataset(train)
    meta = data.meta
    assert meta.kind == "latents" and meta.channels == 4 and meta.grid == (4, 4) and len(data) == 9
    assert meta.tokenizer_checksum == tok.checksum and data.variants == 2 and CacheDataset(val).variants == 1
    latents = np.load(train / "latents.npy").astype(np.float64)  # (N, V, C, h, w)
    assert np.allclose(meta.latent_mean, latents.mean(axis=(0, 1, 3, 4)), atol=1e-5)
    assert np.allclose(meta.latent_std, latents.std(axis=(0, 1, 3, 4)), atol=1e-4)
    x, label = data[(0, 0)]
    assert x.shape == (4, 4, 4) and x.dtype == torch.float32
    images = torch.from_numpy(np.load(kl_run.parent / "data.npz")["images"][:2]).float()[:, None] / 127.5 - 1
    z = tok.encode(images)
    assert torch.allclose(torch.from_numpy(latents[:2, 0]).float(), z, atol=1e-2)  # plain variant, float16
    assert tok.decode(z).shape == (2, 3, 16, 16)
    with pytest.raises(FileExistsError):
        encode_run(kl_run, "val", val)


def test_dit_train_and_sample(tmp_path, caches):
    train, val = caches
    cfg = configlib.load(DiTRunConfig, "dit_fmnist", [
        "model.size=tiny", "train.steps=3", "train.batch_size=4", "train.ckpt_every=3", "train.log_every=1",
        "train.num_workers=0", "train.device=cpu", "train.progress=false", "sample.grid_at_checkpoint=3",
        "sample.grid_steps=2", "val.batch_size=2"])  # fmt: skip
    run = tmp_path / "dit"
    last = train_run(cfg, train, run, val_cache=val)
    assert {"flow/loss", "flow/mse", "flow/direction", "val/loss"} <= set(last)
    assert (run / "samples" / "step_0000003.png").is_file()
    record = json.loads((run / "val" / "step_0000003.json").read_text())
    assert record["step"] == 3 and record["loss"] == pytest.approx(last["val/loss"]) and record["weights"] == "ema"
    info = json.loads((run / "model.json").read_text())
    assert info["kind"] == "dit" and info["channels"] == 4 and info["latent_mean"] is not None
    assert info["grid"] == [4, 4] and info["tokens_per_image"] == 16 and info["num_classes"] == 3
    assert info["non_embedding_parameters"] < info["parameters"] and info["train_flops_per_token"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["kind"] == "dit"

    model, loaded = load_run(run)
    assert loaded["weights"] == "ema" and loaded["step"] == 3 and not model.training and len(loaded["checksum"]) == 64
    out = sample_run(run, 5, tmp_path / "s.npz", steps=2, sampler="heun", cfg_scale=1.5, batch_size=2, grid=4)
    with np.load(out) as f:
        images, labels, protocol = f["arr_0"], f["arr_1"], json.loads(str(f["protocol"]))
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 0, 1, 1, 2]
    assert protocol["sampler"] == "flow-heun" and protocol["nfe"] == 4 and protocol["cfg_channels"] == "all"
    assert protocol["timestep_shift"] == 0.3 and out.with_suffix(".png").is_file()
    # a sample does not depend on the batch size
    again = sample_run(run, 5, tmp_path / "t.npz", steps=2, sampler="heun", cfg_scale=1.5, batch_size=5, grid=0)
    with np.load(again) as f:
        assert np.array_equal(f["arr_0"], images)
    assert torch.equal(sample_noise(range(3, 4), (2, 2), 7)[0], sample_noise(range(0, 5), (2, 2), 7)[3])

    # through the CLI, with the kind's own options; the run's cfg_scale (1: no guidance) by default
    assert main(["generator", "sample", str(run), "--num", "2", "--out", str(tmp_path / "c.npz"), "--device", "cpu",
                 "--precision", "fp32", "--grid", "0", "--steps", "1", "--cfg-interval", "0.2", "1.0"]) == 0
    protocol = json.loads((tmp_path / "c.json").read_text())["protocol"]
    assert protocol["steps"] == 1 and protocol["cfg_interval"] == [0.2, 1.0] and protocol["cfg_scale"] == 1.0
    with pytest.raises(RunLoadError, match="no config.yaml"):
        load_run(tmp_path)
