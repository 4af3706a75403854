"""DiTTask: one flow-training step, normalization, validation loss, checkpoint sample grids."""

import json

import numpy as np
import pytest
import torch

from twostage import config as configlib
from twostage.data.cache_writer import write_arrays
from twostage.data.token_cache import CacheDataset, CacheMeta
from twostage.engine.task import PhaseContext
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.task import DiTTask, LatentSpace, generate_latents
from twostage.generators.outputs import balanced_labels

TINY = ["model.size=tiny", "train.device=cpu", "val.batch_size=3", "sample.grid_at_checkpoint=4",
        "sample.grid_steps=2", "sample.cfg_scale=2.0"]


def space(**kw):
    return LatentSpace(channels=4, grid=(4, 4), num_classes=3, latent_mean=[1.0, 0.0, -1.0, 2.0],
                       latent_std=[2.0, 1.0, 0.5, 1.0], **kw)


def make(*extra, **kw):
    torch.manual_seed(0)
    return DiTTask(configlib.load(DiTRunConfig, None, TINY + list(extra)), space(), **kw)


def test_structure_and_normalization():
    task = make()
    assert list(task.modules) == ["dit"] and task.ema_modules() == ["dit"]
    assert [(p.name, p.optimizers) for p in task.phases()] == [("flow", ["dit"])]
    assert task.optimizers()["dit"].config.kind == "adamw"
    x = torch.randn(2, 4, 4, 4)
    z = task.normalize(x)
    assert torch.allclose(z[:, 0], (x[:, 0] - 1) / 2) and torch.allclose(task.denormalize(z), x, atol=1e-6)
    raw = make("flow.normalize_latents=false")
    assert torch.equal(raw.normalize(x), x)


def test_flow_step_trains_and_logs_tensors():
    task = make("label_dropout=0.5")
    model = task.modules["dit"]
    batch = (task.denormalize(torch.randn(6, 4, 4, 4)), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss, logs = task.flow_loss(PhaseContext(batch, 0, task.modules, {}, torch.device("cpu")))
    assert set(logs) == {"mse", "direction"} and all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())
    # zero-initialized output: v_hat = 0, so the MSE is E|x_1 - eps|^2 ~ 2 per element on normalized latents
    assert 1.0 < float(logs["mse"]) < 3.5 and float(logs["direction"]) == pytest.approx(1.0)
    loss.backward()
    assert model.final.weight.grad.abs().sum() > 0


def test_cache_meta_and_validation_and_grid(tmp_path):
    meta = CacheMeta(kind="latents", grid=(4, 4), num_classes=3, tokenizer_run="run", tokenizer_checksum="abc",
                     split="val", channels=4, latent_mean=[0.0] * 4, latent_std=[1.0] * 4, image_size=16)
    rng = np.random.default_rng(0)
    write_arrays(tmp_path / "val", meta, rng.normal(size=(7, 2, 4, 4, 4)), np.arange(7) % 3)
    cache = CacheDataset(tmp_path / "val")
    sp = LatentSpace.from_cache_meta(cache.meta, tmp_path / "val")
    assert sp.grid == (4, 4) and sp.channels == 4 and sp.tokenizer_checksum == "abc"
    with pytest.raises(configlib.ConfigError, match="continuous latents"):
        LatentSpace.from_cache_meta(CacheMeta("tokens", (4, 4), 3, "r", "c", "val", codebook_size=8))

    decoded = []

    def decoder(z):
        decoded.append(z.shape)
        return torch.tanh(z[:, :3].repeat_interleave(4, -1).repeat_interleave(4, -2))

    def factory(device):  # draws from the global RNG, as a tokenizer's module init does
        torch.randn(100)
        return decoder

    task = make(val_dataset=cache, decoder=factory)
    logs = task.on_checkpoint(7, tmp_path / "run", task.modules)  # the engine isolates its RNG
    assert {"val/loss", "val/mse", "val/direction", "compute/train_flops", "compute/tokens_seen"} <= set(logs)
    assert logs == task.on_checkpoint(7, tmp_path / "run", task.modules)  # fixed noise and times
    assert (tmp_path / "run" / "samples" / "step_0000007.png").is_file() and decoded == [(4, 4, 4, 4)] * 2
    assert task.modules["dit"].training
    record = json.loads((tmp_path / "run" / "val" / "step_0000007.json").read_text())
    assert record["step"] == 7 and record["loss"] == logs["val/loss"] and record["num_samples"] == 7

    failing = make(decoder=lambda device: (_ for _ in ()).throw(FileNotFoundError("no run")))
    logs = failing.on_checkpoint(1, tmp_path / "run", failing.modules)  # warns, keeps training
    assert set(logs) == {"compute/train_flops", "compute/tokens_seen"}


def test_generate_latents_and_balanced_labels():
    task = make()
    labels = torch.from_numpy(balanced_labels(7, 3))
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    g = torch.Generator().manual_seed(1)
    z = generate_latents(task.modules["dit"], labels, steps=3, sampler="heun", shift=0.3, cfg_scale=1.5,
                         interval=(0.1, 1.0), generator=g)
    assert z.shape == (7, 4, 4, 4) and torch.isfinite(z).all()
    # zero-initialized network: v = 0, so the sample is the seeded noise itself
    assert torch.equal(z, torch.randn(7, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
