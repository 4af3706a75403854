"""VQTokenizerTask: modules/optimizers/phases, one manual training step of each phase, previews."""

import json

import pytest
import torch
from torch import nn

from twostage import config as configlib
from twostage.engine.task import PhaseContext
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.task import VQTokenizerTask


class TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def feature_maps(self, images, size=None):
        return [torch.relu(self.a(images))]


TINY = [
    "data.image_size=16", "model.base_channels=8", "model.channel_mult=[1,2,2]", "model.enc_res_blocks=1",
    "model.dec_res_blocks=1", "model.z_channels=8", "model.norm_groups=4", "model.codebook_size=64",
    "model.code_dim=4", "loss.disc_channels=8", "loss.disc_layers=2", "loss.disc_start=0",
    "crt.enabled=true", "crt.width=32", "crt.heads=2", "crt.ramp_steps=10", "train.device=cpu",
    "monitor.grid_images=4",
]  # fmt: skip


def make(*extra):
    torch.manual_seed(0)
    cfg = configlib.load(VQRunConfig, None, TINY + list(extra))
    return VQTokenizerTask(cfg, perceptual=TinyFeatures())


def ctx(task, batch, step=5, trained=("tokenizer", "crt"), scratch=None):
    for name, m in task.modules.items():
        m.requires_grad_(name in trained)
    return PhaseContext(batch, step, task.modules, {} if scratch is None else scratch, torch.device("cpu"))


def test_structure():
    task = make()
    assert set(task.modules) == {"tokenizer", "crt", "disc"}
    specs = task.optimizers()
    assert {k: v.modules for k, v in specs.items()} == {"ae": ["tokenizer"], "crt": ["crt"], "disc": ["disc"]}
    assert specs["crt"].config.kind == "adamw"
    phases = task.phases()
    assert [(p.name, p.optimizers) for p in phases] == [("autoencoder", ["ae", "crt"]), ("discriminator", ["disc"])]
    plain = make("crt.enabled=false", "loss.gan_weight=0", "loss.disc_start=100")
    assert set(plain.modules) == {"tokenizer"} and [p.name for p in plain.phases()] == ["autoencoder"]
    late = make("loss.disc_start=100")
    assert not late.phases()[1].active(99) and late.phases()[1].active(100)


def test_autoencoder_and_discriminator_steps():
    task = make()
    images = torch.rand(4, 1, 16, 16) * 2 - 1  # grayscale batch through an RGB tokenizer
    batch = (images, torch.zeros(4, dtype=torch.long))
    scratch = {}
    loss, logs = task.autoencoder_loss(ctx(task, batch, scratch=scratch))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())  # no host syncs
    assert {"pixel", "perceptual", "codebook", "commit", "gan_g", "crt", "crt_weight", "usage", "perplexity"} <= set(logs)
    assert float(logs["crt_weight"]) == pytest.approx(2.0)  # step 5 of a 10-step ramp to 4
    loss.backward()
    tok, crt, disc = task.modules["tokenizer"], task.modules["crt"], task.modules["disc"]
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert crt.start.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    before = tok.encoder.conv_in.weight.detach().clone()
    torch.optim.Adam(list(tok.parameters()) + list(crt.parameters()), lr=1e-3).step()
    assert not torch.equal(before, tok.encoder.conv_in.weight)

    assert scratch["recon"].shape == (4, 3, 16, 16) and not scratch["recon"].requires_grad
    d_loss, d_logs = task.discriminator_loss(ctx(task, batch, trained=("disc",), scratch=scratch))
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    assert set(d_logs) == {"d", "logits_real", "logits_fake"}


def test_adaptive_gan_weight_and_l1():
    task = make("loss.adaptive_gan_weight=true", "loss.pixel=l1", "crt.enabled=false")
    loss, logs = task.autoencoder_loss(ctx(task, torch.rand(2, 3, 16, 16) * 2 - 1))
    assert torch.isfinite(logs["gan_adaptive_weight"]) and float(logs["gan_adaptive_weight"]) >= 0
    loss.backward()


def test_class_conditional_crt_reads_the_labels():
    task = make("crt.num_classes=3")
    batch = (torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 2]))
    loss, logs = task.autoencoder_loss(ctx(task, batch))
    loss.backward()
    assert task.modules["crt"].class_emb.weight.grad[2].abs().sum() > 0


def test_gan_off_before_start_and_crt_zero_at_step_zero():
    task = make("loss.disc_start=10")
    loss, logs = task.autoencoder_loss(ctx(task, torch.rand(2, 3, 16, 16) * 2 - 1, step=0))
    assert "gan_g" not in logs and float(logs["crt_weight"]) == 0.0


def test_checkpoint_preview_and_extra_state(tmp_path):
    task = make()
    task.autoencoder_loss(ctx(task, torch.rand(4, 3, 16, 16) * 2 - 1, step=3))
    logs = task.on_checkpoint(3, tmp_path, task.modules)
    assert (tmp_path / "samples" / "recon_0000003.png").is_file()
    assert 0 < logs["tokenizer/codebook_usage"] <= 1 and "tokenizer/preview_psnr" in logs
    state = json.loads(json.dumps(task.extra_state()))
    other = make()
    other.load_extra_state(state)
    assert float(other.usage.usage(3)) == pytest.approx(float(task.usage.usage(3)))


def test_effnet_perceptual_backbone_runs():
    pytest.importorskip("efficientnet_lite_pytorch")
    from twostage.tokenizers.perceptual import build_perceptual

    loss = build_perceptual("effnet-lite0", size=32)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    d = loss(x, torch.rand(2, 3, 16, 16) * 2 - 1)
    d.sum().backward()
    assert d.shape == (2,) and (d > 0).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["vq_fmnist_f8", "vq_fmnist_f4", "vq_fmnist_f2", "vq_fmnist_f4_crt"])
def test_presets_load(preset):
    cfg = configlib.load(VQRunConfig, preset)
    f = {"vq_fmnist_f8": 8, "vq_fmnist_f4": 4, "vq_fmnist_f2": 2, "vq_fmnist_f4_crt": 4}[preset]
    assert cfg.model.downsample_factor == f and cfg.image_size == 32
    assert cfg.crt.enabled == preset.endswith("crt")
    assert configlib.load(VQRunConfig, preset, ["model.codebook_size=16384", "crt.enabled=true"]).crt.enabled


def test_imagenet_preset_is_the_published_recipe():
    with pytest.raises(configlib.ConfigError, match="data.root"):
        configlib.load(VQRunConfig, "vq16_imagenet256")
    with pytest.raises(configlib.ConfigError, match="lpips_weights"):
        configlib.load(VQRunConfig, "vq16_imagenet256", ["data.root=/data/imagenet"])
    cfg = configlib.load(VQRunConfig, "vq16_imagenet256", ["data.root=/x", "loss.lpips_weights=/w.pth"])
    m, lc = cfg.model, cfg.loss
    assert (m.base_channels, m.channel_mult, m.codebook_size, m.code_dim, m.commit_weight) == (
        128, (1, 1, 2, 2, 4), 16384, 8, 0.25)
    assert (lc.gan_weight, lc.disc_start, lc.perceptual_weight, lc.pixel) == (0.5, 20000, 1.0, "l2")
    assert (cfg.train.batch_size, cfg.train.steps, cfg.optim.ae.lr, cfg.optim.ae.betas) == (128, 400000, 1e-4, (0.9, 0.95))
    with pytest.raises(configlib.ConfigError, match="divisible"):
        configlib.load(VQRunConfig, "vq16_imagenet256", ["data.root=/x", "loss.lpips_weights=/w",
                                                                 "data.image_size=264"])
