"""RAE tokenizer (docs/methods.md (7.10)-(7.12)): config, noise augmentation, normalization, the frozen encoder,
decoder shapes, and one engine step, on tiny stand-in networks (the real EfficientNet: test_rae_run.py)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from twostage import config as configlib
from twostage.common.errors import UserError
from twostage.engine.task import PhaseContext
from twostage.tokenizers.rae.config import RAEDecoderConfig, RAERunConfig
from twostage.tokenizers.rae.decoder import ViTDecoder
from twostage.tokenizers.rae.encoder import RepresentationEncoder
from twostage.tokenizers.rae.model import RAEModel, noise_augment
from twostage.tokenizers.rae.task import STATS_FILE, RAETokenizerTask


class TinyNetwork(nn.Module):
    """A feature network with the backbones' interface: two maps, strides 2 and 4 (at its input size)."""

    name = "Tiny"
    input_size = 16

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 10, 3, stride=2, padding=1)

    def feature_maps(self, images, size=None):
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        if size is not None and x.shape[-1] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        a = torch.tanh(self.a(x))
        return [a, self.b(a)]


TINY = ["data.image_size=16", "model.patch_size=4", "model.decoder.width=32", "model.decoder.depth=1",
        "model.decoder.heads=2", "loss.perceptual=none", "loss.gan_weight=0", "train.device=cpu",
        "monitor.grid_images=0"]


def tiny_cfg(*extra):
    return configlib.load(RAERunConfig, None, TINY + list(extra))


def tiny_model(*extra, seed=0):
    torch.manual_seed(seed)
    return RAEModel(tiny_cfg(*extra).model, TinyNetwork(), image_size=16)


def test_defaults_are_the_paper_recipe_and_mistakes_are_named(tmp_path):
    cfg = configlib.load(RAERunConfig, None)
    m, d, lc, opt = cfg.model, cfg.model.decoder, cfg.loss, cfg.optim.ae
    assert (m.patch_size, m.noise_tau, m.encoder.network, m.encoder.layer_norm) == (16, 0.8, "effnet-lite0", True)
    assert (d.width, d.depth, d.heads) == (1152, 28, 16)
    assert (lc.pixel, lc.gan_weight, lc.adaptive_gan_weight) == ("l1", 0.75, True)
    assert (opt.kind, opt.lr, opt.betas, opt.weight_decay, opt.grad_clip) == ("adamw", 2e-4, (0.9, 0.95), 0.0, None)
    assert cfg.norm.enabled and cfg.model.downsample_factor == 16
    with pytest.raises(configlib.ConfigError, match="model.encoder.weights=PATH.*dinov2_vitb14_reg4_pretrain.pth"):
        configlib.load(RAERunConfig, None, ["model.encoder.network=dinov2"])
    with pytest.raises(configlib.ConfigError, match="divisible by the downsampling factor 16.*model.patch_size"):
        configlib.load(RAERunConfig, None, ["data.image_size=40"])
    with pytest.raises(configlib.ConfigError, match="model.decoder.width=30"):
        configlib.load(RAERunConfig, None, ["model.decoder.width=30", "model.decoder.heads=3"])
    with pytest.raises(configlib.ConfigError, match="model.encoder.layer=5"):
        RepresentationEncoder(tiny_cfg("model.encoder.layer=5").model.encoder, TinyNetwork())
    # a DINOv2 file that is not there: a UserError naming the file and where to get one
    missing = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    cfg = tiny_cfg("model.encoder.network=dinov2", f"model.encoder.weights={missing}")
    with pytest.raises(UserError, match=f"model.encoder.weights: .*{missing}.*dinov2_vitb14_reg4_pretrain.pth"):
        RAEModel(cfg.model)


def test_noise_augmentation_draws_one_uniform_sigma_per_image():
    tau, n = 0.8, 2000
    z = torch.zeros(n, 16, 8, 8)
    noisy, sigma = noise_augment(z, tau, torch.Generator().manual_seed(0))
    assert sigma.shape == (n,) and float(sigma.min()) >= 0 and float(sigma.max()) <= tau
    # U(0, tau): mean tau/2, variance tau^2/12, and an even spread over the interval (KS distance)
    assert abs(float(sigma.mean()) - tau / 2) < 0.02 and abs(float(sigma.var()) - tau**2 / 12) < 0.005
    ks = (torch.sort(sigma).values / tau - torch.arange(1, n + 1) / n).abs().max()
    assert float(ks) < 0.04
    # one sigma per image: each image's noise has std sigma_i (1024 draws each), zero mean
    per_image = noisy.flatten(1)
    assert torch.allclose(per_image.std(dim=1), sigma, atol=0.06, rtol=0.06)
    assert float(per_image.mean(dim=1).abs().max()) < 0.15

    model = tiny_model()
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    model.train()
    first, second = model(x), model(x)
    assert (first.sigma > 0).all() and (first.sigma <= 0.8).all() and not torch.equal(first.sigma, second.sigma)
    assert not torch.allclose(first.recon, second.recon)
    assert torch.equal(first.latent, second.latent)  # the encoder output itself is never noised
    assert torch.equal(model(x, noise=False).sigma, torch.zeros(6))
    model.eval()  # inference: sigma = 0, deterministic
    a, b = model(x), model(x)
    assert torch.equal(a.sigma, torch.zeros(6)) and torch.equal(a.recon, b.recon)
    assert torch.equal(a.recon, model.decode(model.encode(x)))
    quiet = tiny_model("model.noise_tau=0").train()
    assert torch.equal(quiet(x).sigma, torch.zeros(6))


def test_normalization_round_trip():
    model = tiny_model().eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    raw = model.encode_features(x)
    assert torch.equal(model.encode(x), raw) and not model.has_latent_stats  # identity until computed
    mean, std = torch.linspace(-1, 1, model.latent_channels), torch.linspace(0.5, 2, model.latent_channels)
    model.set_latent_stats(mean, std, images=7)
    z = model.encode(x)
    assert torch.allclose(z, (raw - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    assert torch.allclose(model.denormalize(z), raw, atol=1e-6)
    assert torch.allclose(model.decode(z), model.decoder(raw), atol=1e-5)  # decode undoes the normalization
    # the statistics are model state: a fresh model loading the weights encodes the same
    again = tiny_model()  # the same (stand-in) encoder, as a pretrained one is
    again.load_state_dict(model.state_dict())
    assert again.has_latent_stats and int(again.latent_stats_images) == 7
    assert torch.allclose(again.eval().encode(x), z)
    with pytest.raises(ValueError, match="positive"):
        model.set_latent_stats(mean, torch.zeros_like(std), 1)


def test_decoder_shapes_and_patch_layout():
    cfg = RAEDecoderConfig(width=32, depth=2, heads=4)
    dec = ViTDecoder(in_channels=10, out_channels=3, patch=4, grid=(4, 4), cfg=cfg)
    assert dec(torch.randn(2, 10, 4, 4)).shape == (2, 3, 16, 16)
    assert dec(torch.randn(2, 10, 2, 3)).shape == (2, 3, 8, 12)  # another grid: positions built on the fly
    gray = ViTDecoder(in_channels=10, out_channels=1, patch=2, grid=(3, 3), cfg=cfg)
    assert gray(torch.randn(1, 10, 3, 3)).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"\(N, 10, h, w\)"):
        dec(torch.randn(2, 9, 4, 4))
    # token (i, j) paints exactly the pixel block [i*p, (i+1)*p) x [j*p, (j+1)*p), channel by channel
    h, w, p, c = 2, 3, 4, 3
    tokens = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1).expand(1, h * w, p * p * c)
    channel = torch.arange(c, dtype=torch.float32).repeat(p * p) * 100  # per-patch layout (p, p, C)
    img = dec.unpatchify(tokens + channel, (h, w))
    assert img.shape == (1, c, h * p, w * p)
    for i in range(h):
        for j in range(w):
            block = img[0, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
            assert torch.equal(block, (i * w + j + 100 * torch.arange(c, dtype=torch.float32)).view(c, 1, 1)
                               .expand(c, p, p))


def test_the_encoder_is_frozen_outside_the_model_state():
    model = tiny_model()
    enc = model.encoder
    assert model.latent_channels == 10 and enc.input_size((4, 4)) == 16  # stride-4 map at 16 px: a 4x4 grid
    assert not any(p.requires_grad for p in enc.parameters())
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in enc.parameters())
    assert set(model.state_dict()) - {k for k in model.state_dict() if k.startswith("decoder.")} == \
        {"latent_mean", "latent_std", "latent_stats_images"}
    model.train()
    assert not enc.training  # train() never reaches it
    model.double()
    assert next(enc.parameters()).dtype == torch.float64  # but device / dtype moves do
    model.float()
    copy = __import__("copy").deepcopy(model)  # the EMA's copy shares the one encoder
    assert copy.encoder is enc and copy.decoder is not model.decoder


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rae_data")
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", images=rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8), labels=np.arange(12) % 3)
    return tmp / "data.npz"


def run_overrides(npz):
    return ["data.name=npz", f"data.root={npz}", "data.val_fraction=0.25", "norm.images=6", "train.steps=2",
            "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0",
            "train.progress=false", "train.ema_decay=0.9", "optim.ae.warmup_steps=0", "optim.ae.lr=1e-2"]


def test_a_train_step_moves_the_decoder_only_and_statistics_are_computed_once(npz, tmp_path, monkeypatch):
    cfg = tiny_cfg(*run_overrides(npz))
    torch.manual_seed(0)
    task = RAETokenizerTask(cfg, encoder_network=TinyNetwork())
    model = task.modules["tokenizer"]
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    # one autoencoder loss: gradients reach the decoder, never the encoder
    loss, logs = task.autoencoder_loss(PhaseContext(torch.rand(4, 1, 16, 16) * 2 - 1, 0, task.modules, {},
                                                    torch.device("cpu")))
    loss.backward()
    assert {"pixel", "noise_sigma", "latent_rms"} <= set(logs) and all(v.ndim == 0 for v in logs.values())
    assert abs(float(logs["latent_rms"]) - 1) < 1e-3  # layer norm over channels: unit RMS per position
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder.head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    out = tmp_path / "run"
    from twostage.engine.trainer import train
    from twostage.data import build_dataset

    train(task, cfg.train, build_dataset(cfg.data, "train"), out, full_config=cfg)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in dec_before.items())
    keys = set(load_file(out / "checkpoints" / "step_0000002" / "ema.safetensors"))
    assert keys and all(k.startswith("tokenizer.") for k in keys) and not any(".encoder." in k for k in keys)

    # statistics: the first norm.images=6 training images, every position, written with the run
    record = json.loads((out / STATS_FILE).read_text())
    assert record["images"] == 6 and int(model.latent_stats_images) == 6
    from twostage.tokenizers.run import split_loader

    data, _ = split_loader(cfg, "train", 6, limit=6)
    images = torch.stack([data[i][0] for i in range(6)])
    raw = model.encode_features(images.expand(-1, 3, -1, -1)).double()
    assert torch.allclose(model.latent_mean.double(), raw.mean(dim=(0, 2, 3)), atol=1e-5)
    std = (raw.var(dim=(0, 2, 3), unbiased=False) + cfg.norm.eps).sqrt()
    assert torch.allclose(model.latent_std.double(), std, atol=1e-5)
    assert np.allclose(record["std"], std.numpy(), atol=1e-5)
    z = model.encode(images.expand(-1, 3, -1, -1))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (z.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3

    # a resumed run keeps its checkpoint's statistics instead of computing them again
    def never(*_):
        raise AssertionError("statistics recomputed on resume")

    monkeypatch.setattr(RAETokenizerTask, "latent_statistics", never)
    resumed = tiny_cfg(*run_overrides(npz), "train.steps=3")
    again = RAETokenizerTask(resumed, encoder_network=TinyNetwork())
    train(again, resumed.train, build_dataset(resumed.data, "train"), out, full_config=resumed)
    assert torch.equal(again.modules["tokenizer"].latent_std, model.latent_std)


def test_disabled_normalization_and_the_shared_perceptual_network(npz, tmp_path):
    cfg = tiny_cfg(*run_overrides(npz), "norm.enabled=false", "train.steps=1")
    task = RAETokenizerTask(cfg, encoder_network=TinyNetwork())
    task.on_start(tmp_path, resumed=False)
    assert not task.modules["tokenizer"].has_latent_stats and not (tmp_path / STATS_FILE).exists()
    # effnet-lite0 as encoder and perceptual network: one frozen instance serves both
    shared = RAETokenizerTask(configlib.load(RAERunConfig, None, [
        "data.image_size=16", "model.patch_size=4", "model.encoder.layer=1", "model.decoder.width=32",
        "model.decoder.depth=1", "model.decoder.heads=2", "loss.gan_weight=0", "train.device=cpu"]))
    assert shared.modules["tokenizer"].encoder.features.network is shared.perceptual.backbone
    assert shared.modules["tokenizer"].latent_channels == 24  # EfficientNet-Lite0's stride-4 map


def test_a_local_dinov2_file_is_the_encoder(tmp_path):
    # a tiny ViT in the official DINOv2 layout (4 registers, as RAE's DINOv2-B/14-reg), written as a local file
    from twostage.backbones.dinov2 import DINOv2ViT

    torch.manual_seed(0)
    path = tmp_path / "dinov2_tiny_reg4.pth"
    torch.save(DINOv2ViT(dim=64, depth=2, registers=4, pos_grid=4).state_dict(), path)
    cfg = configlib.load(RAERunConfig, None, [
        "data.image_size=64", "model.encoder.network=dinov2", f"model.encoder.weights={path}",
        "model.decoder.width=32", "model.decoder.depth=1", "model.decoder.heads=2"])  # fmt: skip
    model = RAEModel(cfg.model, image_size=64).eval()
    enc = model.encoder
    assert enc.name == "DINOv2-ViT-64d14-reg4" and model.latent_channels == 64
    assert enc.input_size((4, 4)) == 56  # 4x4 patches of 14 px: RAE's 224 px for a 16x16 grid
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = model.encode_features(x)
    assert z.shape == (2, 64, 4, 4)
    # the last block's patch tokens, standardized over channels without affine (RAE's LayerNorm sans affine)
    last = enc.features.network.feature_maps(x, 56)[-1]
    assert torch.allclose(z, nn.functional.layer_norm(last.permute(0, 2, 3, 1), (64,), eps=1e-6).permute(0, 3, 1, 2),
                          atol=1e-5)
    assert model(x).recon.shape == (2, 3, 64, 64)
