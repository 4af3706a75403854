"""KL-VAE tokenizer: spec parsing, model shapes, posterior, task phases and losses (tiny CPU models)."""

import pytest
import torch
from torch import nn

from twostage import config as configlib
from twostage.engine.task import PhaseContext
from twostage.tokenizers.kl.config import KLRunConfig, parse_spec
from twostage.tokenizers.kl.model import DiagonalGaussian, KLModel
from twostage.tokenizers.kl.task import KLTokenizerTask


class TinyFeatures(nn.Module):
    name = "Tiny"
    input_size = 16

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=4, padding=1)

    def feature_maps(self, images, size=None):
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if size is not None and images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
        return [torch.relu(self.a(images))]


TINY = [
    "data.image_size=16", "model.spec=f4d4", "model.base_channels=8", "model.enc_res_blocks=1",
    "model.dec_res_blocks=1", "model.norm_groups=4", "loss.disc_channels=8", "loss.disc_layers=2",
    "loss.disc_start=0", "train.device=cpu", "monitor.grid_images=4",
]  # fmt: skip


def make(*extra):
    torch.manual_seed(0)
    cfg = configlib.load(KLRunConfig, None, TINY + list(extra))
    return KLTokenizerTask(cfg, perceptual=TinyFeatures(), vf_network=TinyFeatures())


def ctx(task, batch, step=5, trained=("tokenizer", "aux"), scratch=None):
    for name, m in task.modules.items():
        m.requires_grad_(name in trained)
    return PhaseContext(batch, step, task.modules, {} if scratch is None else scratch, torch.device("cpu"))


def test_specs_and_recipe_defaults():
    assert parse_spec("f16d32") == (16, 32) and parse_spec("f8d4") == (8, 4)
    for bad in ("f12d4", "f16", "d32f16"):
        with pytest.raises(configlib.ConfigError):
            parse_spec(bad)
    cfg = configlib.load(KLRunConfig, None)
    m, lc, vf = cfg.model, cfg.loss, cfg.vf
    assert (m.levels, m.downsample_factor, m.latent_channels, m.base_channels) == ((1, 1, 2, 2, 4), 16, 32, 128)
    assert (lc.pixel, lc.kl_weight, lc.gan_weight, lc.adaptive_gan_weight) == ("l1", 1e-6, 0.5, True)
    assert (vf.cos_margin, vf.distmat_margin, vf.weight, vf.adaptive_max, vf.network) == (0.5, 0.25, 0.1, 1e8, "effnet-lite0")
    assert (cfg.optim.ae.kind, cfg.optim.ae.betas, cfg.optim.ae.lr, cfg.optim.ae.grad_clip) == ("adam", (0.5, 0.9), 1e-4, None)
    part = configlib.load(KLRunConfig, None, ["optim.ae.lr=2e-4"])  # a partial section keeps the recipe
    assert part.optim.ae.betas == (0.5, 0.9)
    with pytest.raises(configlib.ConfigError, match="levels"):
        configlib.load(KLRunConfig, None, ["model.spec=f8d4", "model.channel_mult=[1,2]"])
    with pytest.raises(configlib.ConfigError, match="divisible"):
        configlib.load(KLRunConfig, None, ["model.spec=f16d16", "data.image_size=40"])
    with pytest.raises(configlib.ConfigError, match="vf.weights"):
        configlib.load(KLRunConfig, None, ["vf.network=dinov2"])


@pytest.mark.parametrize("spec,grid", [("f4d4", (4, 4)), ("f8d16", (2, 2)), ("f2d3", (8, 8))])
def test_model_shapes(spec, grid):
    cfg = configlib.load(KLRunConfig, None, TINY + [f"model.spec={spec}"])
    model = KLModel(cfg.model)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    d = cfg.model.latent_channels
    assert out.recon.shape == x.shape and out.latent.shape == (2, d, *grid) and model.grid_size(16) == grid
    assert out.posterior.mean.shape == (2, d, *grid)
    assert torch.equal(model(x, sample=False).latent, model.encode(x).mode())


def test_posterior_kl_and_sampling():
    moments = torch.zeros(3, 4, 2, 2)  # mean 0, logvar 0: the prior itself
    post = DiagonalGaussian(moments)
    assert torch.allclose(post.kl(), torch.zeros(3))
    moments[:, 0] = 1.0  # one channel with mean 1: KL = 0.5 * 1 per position
    assert torch.allclose(DiagonalGaussian(moments).kl(), torch.full((3,), 0.5 * 4))
    g = torch.Generator().manual_seed(0)
    s = DiagonalGaussian(torch.cat([torch.full((4000, 1, 1, 1), 2.0), torch.full((4000, 1, 1, 1), 2 * 0.693147)], 1))
    z = s.sample(g)
    assert abs(float(z.mean()) - 2) < 0.1 and abs(float(z.std()) - 2) < 0.1


def test_structure_and_phases():
    task = make()
    assert set(task.modules) == {"tokenizer", "aux", "disc"}
    assert {k: v.modules for k, v in task.optimizers().items()} == {"ae": ["tokenizer", "aux"], "disc": ["disc"]}
    assert task.modules["aux"].vf_proj.weight.shape == (6, 4, 1, 1)  # latent d=4 -> feature width 6, no bias
    assert task.modules["aux"].vf_proj.bias is None
    late = make("loss.disc_start=10")
    assert not late.phases()[1].active(9) and late.phases()[1].active(10)
    plain = make("loss.gan_weight=0", "vf.enabled=false")
    assert set(plain.modules) == {"tokenizer", "aux"} and plain.modules["aux"].vf_proj is None


def test_autoencoder_and_discriminator_steps():
    task = make()
    images = torch.rand(4, 1, 16, 16) * 2 - 1  # grayscale batch through an RGB tokenizer
    scratch = {}
    loss, logs = task.autoencoder_loss(ctx(task, (images, torch.zeros(4, dtype=torch.long)), scratch=scratch))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())  # no host syncs
    expected = {"pixel", "perceptual", "nll", "kl", "logvar", "gan_g", "gan_adaptive_weight", "vf", "vf_mcos",
                "vf_mdms", "vf_adaptive_weight"}
    assert expected <= set(logs)
    assert float(logs["vf_adaptive_weight"]) > 0 and float(logs["gan_adaptive_weight"]) > 0
    loss.backward()
    tok, aux, disc = task.modules["tokenizer"], task.modules["aux"], task.modules["disc"]
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert aux.logvar.grad is not None and aux.vf_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    d_loss, d_logs = task.discriminator_loss(ctx(task, images, trained=("disc",), scratch=scratch))
    d_loss.backward()
    assert set(d_logs) == {"d", "logits_real", "logits_fake"}
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)


def test_vf_gradient_reaches_the_encoder():
    # only the VF term: its gradient must reach the encoder (through z), never the decoder
    task = make("loss.gan_weight=0", "loss.pixel_weight=0", "loss.perceptual_weight=0", "loss.kl_weight=0",
                "vf.adaptive=false", "vf.weight=1.0")
    loss, logs = task.autoencoder_loss(ctx(task, torch.rand(2, 3, 16, 16) * 2 - 1))
    loss = loss - logs["nll"]  # remove the (pixel-free) logvar term
    loss.backward()
    tok = task.modules["tokenizer"]
    assert tok.encoder.conv_out.weight.grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad is None or tok.decoder.conv_out.weight.grad.abs().sum() == 0


def test_checkpoint_preview(tmp_path):
    task = make()
    task.autoencoder_loss(ctx(task, torch.rand(4, 3, 16, 16) * 2 - 1, step=3))
    logs = task.on_checkpoint(3, tmp_path, task.modules)
    assert (tmp_path / "samples" / "recon_0000003.png").is_file() and "tokenizer/preview_psnr" in logs


def test_presets():
    cfg = configlib.load(KLRunConfig, "kl_fmnist_f4d8")
    assert (cfg.model.downsample_factor, cfg.model.latent_channels, cfg.vf.enabled, cfg.image_size) == (4, 8, True, 32)
    with pytest.raises(configlib.ConfigError, match="data.root"):
        configlib.load(KLRunConfig, "kl_f16d32_imagenet256")
    with pytest.raises(configlib.ConfigError, match="lpips_weights"):
        configlib.load(KLRunConfig, "kl_f16d32_imagenet256", ["data.root=/x", "vf.weights=/d.pth"])
    with pytest.raises(configlib.ConfigError, match="vf.weights"):
        configlib.load(KLRunConfig, "kl_f16d32_imagenet256", ["data.root=/x", "loss.lpips_weights=/w.pth"])
    cfg = configlib.load(KLRunConfig, "kl_f16d32_imagenet256",
                         ["data.root=/x", "loss.lpips_weights=/w.pth", "vf.weights=/d.pth"])
    assert (cfg.model.levels, cfg.model.latent_channels, cfg.train.batch_size, cfg.optim.ae.betas) == (
        (1, 1, 2, 2, 4), 32, 256, (0.5, 0.9))
