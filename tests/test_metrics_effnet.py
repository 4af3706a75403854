"""EfficientNet-Lite0 (twostage/backbones/effnet_lite0.py): shapes, frozen state, differentiable
feature maps, real-photo sanity; and feature extraction over it (twostage/metrics/extraction.py)."""

import numpy as np
import pytest
import torch

from twostage.backbones import load_feature_network
from twostage.backbones.effnet_lite0 import EffNetLite0
from twostage.common.errors import UserError
from twostage.metrics.extraction import as_model_input, extract_features


@pytest.fixture(scope="module")
def effnet():
    return load_feature_network("effnet-lite0")


def test_effnet_identity_and_shapes(effnet):
    assert effnet.name == "EffNetLite0"
    assert len(effnet.checksum) == 64 and effnet.input_size == 224
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    out = effnet(x)
    assert out["pool"].shape == (2, 1280)
    assert out["spatial"].shape == (2, 14 * 14 * EffNetLite0.spatial_channels)
    assert out["logits"].shape == (2, 1000)
    # grayscale input is accepted and equals its RGB repetition
    g = torch.rand(1, 1, 32, 32) * 2 - 1
    assert torch.allclose(effnet(g)["pool"], effnet(g.repeat(1, 3, 1, 1))["pool"])


def test_effnet_frozen_and_train_is_noop(effnet):
    assert not any(p.requires_grad for p in effnet.parameters())
    parent = torch.nn.Sequential(effnet)
    parent.train()
    assert not effnet.training and not any(m.training for m in effnet.modules())


def test_feature_maps_differentiable(effnet):
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    maps = effnet.feature_maps(x, size=64)
    assert [m.shape[1] for m in maps] == [16, 24, 40, 112, 320]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]
    # LPIPS-style distance to a perturbed copy must give a non-zero gradient on the input
    y = x.detach() + 0.1 * torch.randn_like(x)
    loss = 0
    for a, b in zip(maps, effnet.feature_maps(y, size=64)):
        na = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        nb = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        loss = loss + ((na - nb) ** 2).sum(1).mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in effnet.parameters())


def test_effnet_recognises_real_photos(effnet):
    skd = pytest.importorskip("skimage.data")
    # ImageNet classes: 281-285 are cats, 967 espresso
    from skimage.transform import resize

    imgs = [skd.chelsea()[:, 50:350], skd.coffee()[:, 100:500]]
    x = torch.from_numpy(np.stack([resize(i, (256, 256)) for i in imgs])).permute(0, 3, 1, 2)
    top = effnet(x.float() * 2 - 1)["logits"].argmax(1).tolist()
    assert 281 <= top[0] <= 285 and top[1] == 967


def test_unknown_network_and_missing_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown feature network") as err:
        load_feature_network("vgg16")
    assert isinstance(err.value, UserError)
    assert all(name in str(err.value) for name in ("effnet-lite0", "inception-v3", "dinov2"))
    with pytest.raises(FileNotFoundError, match="not found") as err:
        load_feature_network("EfficientNet_Lite0", tmp_path / "missing.pth")
    assert isinstance(err.value, UserError)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not an EfficientNet-Lite0 state dict"):
        load_feature_network("effnet-lite0", tmp_path / "other.pth")


def test_extraction_treats_uint8_and_float_images_alike(effnet):
    u8 = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 1), dtype=np.uint8)  # NHWC grayscale
    x = as_model_input(u8)
    assert x.shape == (5, 1, 24, 24) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    from_u8 = extract_features(effnet, u8, batch_size=2, keys=("pool",))
    from_float = extract_features(effnet, [x[:3], x[3:]], keys=("pool", "nonexistent"))
    assert set(from_u8) == set(from_float) == {"pool"}
    assert from_u8["pool"].dtype == torch.float64 and from_u8["pool"].shape == (5, 1280)
    torch.testing.assert_close(from_u8["pool"], from_float["pool"], rtol=1e-4, atol=1e-5)  # float32 nets
    with pytest.raises(ValueError, match="precision"):
        extract_features(effnet, u8, precision="fp16")


def test_features_and_maps_take_one_pass_and_equal_the_two_calls(effnet, monkeypatch):
    """Reconstruction metrics need rFD features and perceptual maps of every image: one network pass gives
    both, equal to forward() and feature_maps() called apart; evaluate_reconstruction then runs the
    network twice per batch (originals, reconstructions), not four times."""
    from twostage.metrics.reconstruction import evaluate_reconstruction, map_distance, perceptual_distance

    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    feats, maps = effnet.features_and_maps(x)
    apart = effnet(x)
    assert feats.keys() == apart.keys() and all(torch.equal(feats[k], apart[k]) for k in apart)
    assert len(maps) == len(effnet.feature_maps(x)) and all(torch.equal(a, b) for a, b in zip(maps, effnet.feature_maps(x)))
    assert torch.equal(map_distance(maps, effnet.features_and_maps(y)[1]), perceptual_distance(effnet, x, y))

    runs = []
    real_run = EffNetLite0._run
    monkeypatch.setattr(EffNetLite0, "_run", lambda self, *a: runs.append(1) or real_run(self, *a))
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    metrics, _ = evaluate_reconstruction(lambda t: t.flip(-1), images, effnet, batch_size=4, progress=False)
    assert len(runs) == 2 * 2 and metrics["PD-EffNetLite0"] > 0  # 2 batches x (originals, reconstructions)


def test_resize_antialiases_only_when_it_downsamples():
    """Upsampling with or without antialiasing gives the same image (to float rounding), so the cheaper
    kernel runs; downsampling keeps the antialiased kernel (clean-fid), which differs from the plain one."""
    import torch.nn.functional as F

    from twostage.backbones.base import resize_square

    small, large = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 256, 256)
    aa = lambda x, s: F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    plain = lambda x, s: F.interpolate(x, size=(s, s), mode="bilinear", antialias=False, align_corners=False)
    assert torch.equal(resize_square(small, 128), plain(small, 128))
    assert torch.allclose(resize_square(small, 128), aa(small, 128), atol=1e-5)
    assert torch.equal(resize_square(large, 224), aa(large, 224))
    assert (aa(large, 224) - plain(large, 224)).abs().max() > 1e-3


def test_symmetric_same_padding_inside_the_convolutions_changes_no_value(effnet, monkeypatch):
    """12 of the 17 TF-"same" paddings are symmetric and move into their convolutions (no padded copy per
    layer); features, perceptual maps and the gradient through them equal the network with a ZeroPad2d
    before every padded convolution."""
    monkeypatch.setattr(EffNetLite0, "_pad_inside_convolutions", lambda self: None)
    padded_apart = EffNetLite0()
    count = lambda net: sum(isinstance(m, torch.nn.ZeroPad2d) for m in net.modules())
    assert (count(padded_apart), count(effnet)) == (17, 5)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    for a, b in zip(effnet.feature_maps(x, 128), padded_apart.feature_maps(x, 128)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(effnet(x)["pool"], padded_apart(x)["pool"], atol=1e-5)
    grads = [torch.autograd.grad(sum(m.square().mean() for m in net.feature_maps(x, 128)), x)[0]
             for net in (effnet, padded_apart)]
    assert torch.allclose(*grads, atol=1e-6, rtol=1e-4)
