"""PatchGAN + hinge, adaptive weight, perceptual distance (stand-in backbone and LPIPS-VGG16)."""

import pytest
import torch
from torch import nn

from twostage.config import ConfigError
from twostage.tokenizers.discriminator import PatchGAN, adaptive_weights, hinge_d_loss, hinge_g_loss
from twostage.backbones.lpips_vgg import LPIPSVGG
from twostage.tokenizers.perceptual import PerceptualLoss


class TinyFeatures(nn.Module):
    """Stand-in for twostage.backbones FeatureNetwork: feature_maps(images in [-1,1], size)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def feature_maps(self, images, size=None):
        x = torch.relu(self.a(images))
        return [x, torch.relu(self.b(x))]


def test_patchgan_layout_and_output_grid():
    d = PatchGAN(3, ndf=64, layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert PatchGAN(3, ndf=8, norm="group")(torch.randn(1, 3, 32, 32)).shape == (1, 1, 2, 2)


def test_hinge_losses():
    far_real, far_fake = torch.full((4, 1, 3, 3), 2.0), torch.full((4, 1, 3, 3), -2.0)
    assert float(hinge_d_loss(far_real, far_fake)) == 0.0  # both beyond the margin
    zeros = torch.zeros(4, 1, 3, 3)
    assert float(hinge_d_loss(zeros, zeros)) == 1.0
    assert float(hinge_d_loss(far_fake, far_real)) == 3.0  # fully wrong: 0.5 * (3 + 3)
    assert float(hinge_g_loss(torch.tensor([1.0, 3.0]))) == -2.0


def test_discriminator_step_separates_real_and_fake():
    torch.manual_seed(0)
    d = PatchGAN(3, ndf=8, layers=2, norm="none")
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    real, fake = torch.ones(4, 3, 16, 16) * 0.5, -torch.ones(4, 3, 16, 16) * 0.5
    for _ in range(20):
        loss = hinge_d_loss(d(real), d(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(d(real).mean()) > float(d(fake).mean())


def test_adaptive_weight_is_grad_norm_ratio():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3 * w).sum()  # grad (3, 3) -> norm 3*sqrt(2)
    gan = (w * w).sum()  # grad (2, 4) -> norm sqrt(20)
    got = adaptive_weights(rec, {"gan": (gan, w)})["gan"]
    want = (3 * 2**0.5) / (20**0.5 + 1e-4)
    assert abs(float(got) - want) < 1e-5 and not got.requires_grad


def test_perceptual_distance_zero_for_identical_and_differentiable():
    loss = PerceptualLoss(TinyFeatures())
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loss(y, y), torch.zeros(2), atol=1e-6)
    x = (y + 0.3 * torch.randn_like(y)).requires_grad_(True)
    d = loss(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.backbone.parameters())  # frozen backbone


def test_lpips_vgg_random_and_state_dict_formats(tmp_path):
    torch.manual_seed(0)
    net = LPIPSVGG(random_init=True)
    maps = net.feature_maps(torch.zeros(1, 3, 32, 32))
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512, 512]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]
    # torchvision-style trunk file + lpips-style heads file
    trunk = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(1)  # ignored
    heads = {f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(net.lins)}
    torch.save(trunk, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    loaded = LPIPSVGG(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(PerceptualLoss(loaded)(x, y), PerceptualLoss(net)(x, y))
    assert len(loaded.checksum) == 64 * 2 + 1
    # an LPIPS-package style single file (net.sliceK.N.*, linK.model.1.*) loads too
    slices = {f"net.slice1.{k}": v for k, v in net.features.state_dict().items()} | heads
    torch.save(slices, tmp_path / "lpips_full.pth")
    LPIPSVGG(tmp_path / "lpips_full.pth")
    with pytest.raises(ConfigError, match="lpips_heads"):
        LPIPSVGG(tmp_path / "vgg16.pth")
    with pytest.raises(ConfigError, match="lpips_weights"):
        LPIPSVGG()
