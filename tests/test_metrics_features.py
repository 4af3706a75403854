"""Feature networks: shapes, frozen state, differentiable feature maps, real-photo sanity."""

import numpy as np
import pytest
import torch

from twostage.metrics.features import EffNetLite0, load_feature_network


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


def test_unknown_network_and_missing_weights_errors():
    with pytest.raises(ValueError, match="unknown feature network"):
        load_feature_network("vgg16")
