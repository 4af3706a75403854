"""DiT options: RAE's dimension-dependent time shift (flow.dimension_shift) and REPA (repa.py), on CPU.

A tiny KL run (no VF loss) and its latent caches, as tests/test_dit_run.py builds them, give REPA the
decoder it needs."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twostage import config as configlib
from twostage.engine.task import PhaseContext
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.flow import dimension_shift, sample_time, shift_time
from twostage.generators.dit.repa import Projector, repa_active, repa_loss
from twostage.generators.dit.run import load_run
from twostage.generators.dit.task import DiTTask, LatentSpace, build_model, generate_latents
from twostage.generators.training import train_run
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.run import encode_run
from twostage.tokenizers.run import train_run as train_tokenizer

QUICK = ["model.size=tiny", "train.steps=3", "train.batch_size=4", "train.ckpt_every=3", "train.log_every=1",
         "train.num_workers=0", "train.device=cpu", "train.progress=false", "sample.grid_at_checkpoint=0",
         "val.batch_size=4"]


# -- the time shift ---------------------------------------------------------------------------------------


def test_dimension_shift_is_the_shift_map_with_one_over_alpha():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = math.sqrt(8 * 32 * 32 / 4096)  # m = 8192, n = 4096
    s = dimension_shift(8 * 32 * 32, 4096)
    assert s == pytest.approx(1 / alpha)
    # RAE's map in noise-at-one time sigma = 1 - t, translated back, equals ours with s = 1 / alpha
    sigma = 1 - t
    rae = 1 - alpha * sigma / (1 + (alpha - 1) * sigma)
    assert torch.allclose(shift_time(t, s), rae, atol=1e-12)
    # inverse: s then 1 / s is the identity; s = 1 is the identity; off (None) is s = 1
    for shift in (0.3, s, 2.5):
        assert torch.allclose(shift_time(shift_time(t, shift), 1 / shift), t, atol=1e-12)
    assert torch.equal(shift_time(t, 1.0), t) and dimension_shift(4096, 4096) == 1.0
    assert dimension_shift(123, None) == 1.0
    # shifts compose by multiplying s (the odds t / (1 - t) are multiplied by s)
    assert torch.allclose(shift_time(shift_time(t, 0.3), s), shift_time(t, 0.3 * s), atol=1e-12)


def test_shifted_training_times_stay_in_range_and_move_to_noise():
    t = sample_time(10_000, generator=torch.Generator().manual_seed(0))
    s = dimension_shift(16 * 16 * 768, 4096)  # RAE's DINOv2-B latent: alpha ~ 6.93 > 1
    shifted = shift_time(t, s)
    assert 0 <= float(shifted.min()) and float(shifted.max()) <= 1
    assert (shifted <= t).all() and float(shifted.mean()) < float(t.mean()) - 0.2  # t = 0 is noise


def test_task_shifts_training_times_and_the_sampling_grid():
    space = LatentSpace(channels=4, grid=(4, 4), num_classes=3)
    cfg = configlib.load(DiTRunConfig, None, ["model.size=tiny", "flow.shift_base_dim=16"])
    assert build_model(cfg, space).time_shift == pytest.approx(0.5)  # sqrt(16 / 64)
    assert configlib.load(DiTRunConfig, None, ["model.size=tiny"]).flow.shift_base_dim is None
    task = DiTTask(cfg, space, decoder=lambda d: None)
    t = torch.rand(50)
    assert torch.allclose(task.shift_times(t), shift_time(t, 0.5))
    # generate_latents runs the grid of sample.shift x time_shift: compare against an explicit grid
    calls = []

    class Recorder(torch.nn.Module):
        in_channels, grid, null_label, time_shift = 4, (4, 4), 3, 0.5

        def forward(self, x, t, labels):
            calls.append(float(t[0]))
            return torch.zeros_like(x)

    generate_latents(Recorder(), torch.zeros(2, dtype=torch.long), steps=4, shift=0.3,
                     generator=torch.Generator().manual_seed(0))
    assert calls == pytest.approx([shift_time(i / 4, 0.15) for i in range(4)])


# -- REPA -------------------------------------------------------------------------------------------------


def test_repa_loss_and_stop_step():
    f = torch.randn(3, 5, 8)
    assert float(repa_loss(f, f)) == pytest.approx(-1.0)
    assert float(repa_loss(2 * f, f)) == pytest.approx(-1.0)  # scale-free
    a = torch.zeros(3, 5, 8); a[..., 0] = 1.0
    b = torch.zeros(3, 5, 8); b[..., 1] = 1.0
    assert float(repa_loss(a, b)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        repa_loss(f, f[:, :4])
    assert repa_active(10**9, None) and repa_active(4, 5) and not repa_active(5, 5)
    assert Projector(16, 32, 7)(torch.randn(2, 5, 16)).shape == (2, 5, 7)


def test_repa_config_checks():
    with pytest.raises(configlib.ConfigError, match="repa.layer=3"):
        configlib.load(DiTRunConfig, None, ["model.size=tiny", "repa.enabled=true", "repa.layer=3"])
    with pytest.raises(configlib.ConfigError, match="encoder_weights"):
        configlib.load(DiTRunConfig, None, ["model.size=tiny", "repa.enabled=true", "repa.layer=1",
                                            "repa.encoder=dinov2"])
    configlib.load(DiTRunConfig, None, ["model.size=tiny", "repa.layer=3"])  # off: not checked


def test_hidden_at_returns_the_block_tokens():
    space = LatentSpace(channels=4, grid=(4, 4), num_classes=3)
    model = build_model(configlib.load(DiTRunConfig, None, ["model.size=tiny"]), space)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 1])
    v, h = model(x, t, y, hidden_at=1)
    assert torch.equal(v, model(x, t, y)) and h.shape == (2, 16, 64)
    with pytest.raises(ValueError, match="hidden_at=3"):
        model(x, t, y, hidden_at=3)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kl")
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", images=rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8),
             labels=np.arange(12) % 3)
    cfg = configlib.load(KLRunConfig, None, [
        "data.name=npz", f"data.root={tmp / 'data.npz'}", "data.image_size=16", "data.val_fraction=0.25",
        "model.spec=f4d4", "model.base_channels=8", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
        "model.norm_groups=4", "loss.perceptual=none", "loss.gan_weight=0", "vf.enabled=false",
        "monitor.grid_images=0", "train.steps=1", "train.batch_size=4", "train.ckpt_every=1",
        "train.num_workers=0", "train.device=cpu", "train.progress=false"])  # fmt: skip
    train_tokenizer(cfg, tmp / "kl")
    return encode_run(tmp / "kl", "train", tmp / "cache_train"), encode_run(tmp / "kl", "val", tmp / "cache_val")


def test_repa_run_trains_logs_and_checkpoints_the_projector(tmp_path, caches):
    train, val = caches
    cfg = configlib.load(DiTRunConfig, "dit_fmnist", QUICK + [
        "repa.enabled=true", "repa.layer=1", "repa.projector_dim=16", "repa.stop_step=2"])
    run = tmp_path / "repa"
    last = train_run(cfg, train, run, val_cache=val)
    assert {"flow/loss", "flow/mse", "flow/direction", "val/loss"} <= set(last)
    assert "flow/repa" not in last  # step 3 is past stop_step = 2: the term is off
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    repa = [r["flow/repa"] for r in rows if "flow/repa" in r]
    assert len(repa) == 2 and all(-1 <= v <= 1 for v in repa)  # steps 1 and 2
    raw = load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert {k for k in raw if k.startswith("repa.")} == {f"repa.net.{i}.{p}" for i in (0, 2, 4)
                                                         for p in ("weight", "bias")}
    assert raw["repa.net.4.weight"].shape == (112, 16)  # EffNet-Lite0's stride-16 map: 112 channels
    ema = load_file(str(run / "checkpoints" / "step_0000003" / "ema.safetensors"))
    assert not any(k.startswith("repa.") for k in ema)
    model, info = load_run(run)  # the generator alone: sampling is unchanged
    assert info["step"] == 3 and not any(k.startswith("repa") for k in model.state_dict())
    # training compute counts the projector on every patch token (3 x forward), per latent position
    width, p = model.width, model.patch
    projector = 2 * (width * 16 + 16 * 16 + 16 * 112)
    assert info["train_flops_per_token"] == pytest.approx(model.flops_per_token()["train"] + 3 * projector / p ** 2)
    assert info["repa_projector_parameters"] == width * 16 + 16 + 16 * 16 + 16 + 16 * 112 + 112


def test_repa_step_logs_the_term_and_trains_the_projector(caches):
    train, _ = caches
    from twostage.data.token_cache import CacheDataset

    data = CacheDataset(train)
    space = LatentSpace.from_cache_meta(data.meta, train)
    cfg = configlib.load(DiTRunConfig, "dit_fmnist", QUICK + ["repa.enabled=true", "repa.layer=1",
                                                             "repa.projector_dim=16"])
    torch.manual_seed(0)
    task = DiTTask(cfg, space)
    assert list(task.modules) == ["dit", "repa"] and task.optimizers()["dit"].modules == ["dit", "repa"]
    items = [data[(i, 0)] for i in range(4)]
    batch = (torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items]))
    loss, logs = task.flow_loss(PhaseContext(batch, 0, task.modules, {}, torch.device("cpu")))
    assert set(logs) == {"mse", "direction", "repa"} and -1 <= float(logs["repa"]) <= 1
    assert float(loss.detach()) == pytest.approx(float(logs["mse"] + logs["direction"] + 0.5 * logs["repa"]), rel=1e-5)
    loss.backward()
    assert task.modules["repa"].net[0].weight.grad.abs().sum() > 0
    # the flow loss alone gives the patch embedding no gradient at init (zero output layer and gates):
    # this one comes from the alignment of block 1's tokens
    assert task.modules["dit"].patch_embed.weight.grad.abs().sum() > 0


def test_a_run_without_repa_keeps_its_state_dict_keys(tmp_path, caches):
    train, val = caches
    cfg = configlib.load(DiTRunConfig, "dit_fmnist", QUICK)
    run = tmp_path / "plain"
    last = train_run(cfg, train, run, val_cache=val)
    assert "flow/repa" not in last
    raw = load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors"))
    space = LatentSpace(channels=4, grid=(4, 4), num_classes=3)
    assert set(raw) == {f"dit.{k}" for k in build_model(cfg, space).state_dict()}
