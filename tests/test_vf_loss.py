"""VA-VAE VF loss (twostage/tokenizers/kl/vf_loss.py) and the adaptive weights (discriminator.adaptive_weights)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twostage.tokenizers.discriminator import adaptive_weights
from twostage.tokenizers.kl.vf_loss import FoundationFeatures, resample_to, vf_loss


def test_zero_when_aligned_within_the_margins():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 16, 4, 4, generator=g)
    loss, logs = vf_loss(f.clone(), f)
    assert float(loss) == 0.0 and float(logs["vf_cos"]) == pytest.approx(1.0)
    assert float(vf_loss(3.0 * f, f)[0]) == 0.0  # scale-free: only directions count
    # inside the margins: cos(z', f) > 0.5 and every pairwise cosine within 0.25 -> exactly zero
    near = f + 0.15 * f.norm(dim=1, keepdim=True) / 4 * torch.randn(2, 16, 4, 4, generator=g)
    cos = F.cosine_similarity(near, f, dim=1)
    assert (cos > 0.5).all()
    loss, logs = vf_loss(near, f)
    assert float(logs["vf_mcos"]) == 0.0
    assert float(loss) == float(logs["vf_mdms"])  # the distance-matrix term alone, 0 if within m2
    assert float(vf_loss(near, f, distmat_margin=2.0)[0]) == 0.0


def test_positive_when_misaligned():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 16, 4, 4, generator=g)
    loss, logs = vf_loss(-f, f)  # opposite directions: cos = -1 -> mcos = 1 - 0.5 + 1 = 1.5
    assert float(logs["vf_mcos"]) == pytest.approx(1.5)
    assert float(logs["vf_mdms"]) == 0.0  # the Gram matrix of -f equals that of f
    z = torch.randn(2, 16, 4, 4, generator=g)
    loss, logs = vf_loss(z, f)
    assert float(logs["vf_mcos"]) > 0 and float(logs["vf_mdms"]) > 0
    assert float(loss) == pytest.approx(float(logs["vf_mcos"] + logs["vf_mdms"]))
    weighted, _ = vf_loss(z, f, cos_weight=2.0, distmat_weight=0.0, cos_margin=0.0)
    assert float(weighted) == pytest.approx(2 * float((1 - F.cosine_similarity(z, f, dim=1)).clamp_min(0).mean()))
    # the distance matrix may be taken on the unprojected latent (any width)
    _, logs = vf_loss(z, f, z=torch.randn(2, 3, 4, 4, generator=g))
    assert float(logs["vf_mdms"]) > 0
    with pytest.raises(ValueError, match="differ"):
        vf_loss(z[:, :8], f)


def test_gradients_flow_to_the_latent_only():
    f = torch.randn(1, 8, 3, 3)
    z = torch.randn(1, 8, 3, 3, requires_grad=True)
    vf_loss(z, f)[0].backward()
    assert z.grad.abs().sum() > 0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 4)
    x = torch.randn(8, 4)
    z = enc(x)
    y = dec(z)
    rec = (y - x).pow(2).mean()
    gan = -y.mean()
    vf = z.pow(2).mean()
    w = adaptive_weights(rec, {"gan": (gan, dec.weight), "vf": (vf, enc.weight)}, {"gan": 1e4, "vf": 1e8})
    for name, loss, layer in (("gan", gan, dec.weight), ("vf", vf, enc.weight)):
        g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0].norm()
        g_term = torch.autograd.grad(loss, layer, retain_graph=True)[0].norm()
        assert float(w[name]) == pytest.approx(float(g_rec / (g_term + 1e-4)), rel=1e-5)
        assert not w[name].requires_grad
    # doubling the term halves its weight; the clamp caps it
    w2 = adaptive_weights(rec, {"vf": (2 * vf, enc.weight)})
    assert float(w2["vf"]) == pytest.approx(float(w["vf"]) / 2, rel=1e-3)
    assert float(adaptive_weights(rec, {"vf": (1e-9 * vf, enc.weight)}, 5.0)["vf"]) == 5.0


class Strided(nn.Module):
    """Stand-in feature network: maps at strides 2 and 4 with 5 and 7 channels."""

    name = "Strided"
    input_size = 32

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.b = nn.Conv2d(5, 7, 3, stride=2, padding=1)

    def feature_maps(self, images, size=None):
        if size is not None and images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        a = self.a(images)
        return [a, self.b(a)]


def test_foundation_features_land_on_the_latent_grid():
    feats = FoundationFeatures(Strided())
    assert feats.layer == -1 and feats.channels == 7 and feats.stride == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = feats(x, (4, 4))
    assert out.shape == (2, 7, 4, 4) and not out.requires_grad
    assert feats.size_for((4, 4)) == 16  # 4 x stride 4: no resampling needed
    first = FoundationFeatures(Strided(), layer=0, input_size=32)
    assert first.channels == 5 and first(x, (4, 4)).shape == (2, 5, 4, 4)  # 16x16 map, area-pooled
    with pytest.raises(ValueError, match="feature maps"):
        FoundationFeatures(Strided(), layer=5)
    m = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.allclose(resample_to(m, (2, 2)), F.avg_pool2d(m, 2))
    assert resample_to(m, (8, 8), "area").shape == (1, 1, 8, 8)


def test_effnet_stride16_map_is_the_default():
    pytest.importorskip("efficientnet_lite_pytorch")
    from twostage.tokenizers.kl.vf_loss import build_foundation

    feats = build_foundation("effnet-lite0")
    assert feats.layer == 3 and feats.channels == 112 and feats.stride == 16
    assert feats.size_for((8, 8)) == 128
    assert feats(torch.rand(1, 1, 32, 32) * 2 - 1, (8, 8)).shape == (1, 112, 8, 8)
