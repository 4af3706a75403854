"""Reconstruction metrics against scikit-image on real photos; latent diagnostics."""

import numpy as np
import pytest
import torch

from twostage.backbones import load_feature_network
from twostage.metrics.latent import (
    PositionLoss,
    codebook_usage,
    density_uniformity,
    gini,
    latent_uniformity,
    per_position_ce,
)
from twostage.metrics.reconstruction import evaluate_reconstruction, psnr, quantize, ssim

skd = pytest.importorskip("skimage.data")
skm = pytest.importorskip("skimage.metrics")


def _photos(size=128):
    from skimage.transform import resize

    imgs = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]
    return np.stack([resize(i, (size, size), anti_aliasing=True) for i in imgs])  # float [0,1] NHWC


def test_psnr_ssim_match_scikit_image_on_real_photos():
    ref = _photos()
    rng = np.random.default_rng(0)
    noisy = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    blurred = np.stack([np.stack([np.convolve(r, np.ones(3) / 3, mode="same") for r in img[..., c]])
                        for img in ref for c in range(3)]).reshape(4, 3, 128, 128).transpose(0, 2, 3, 1)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    for other in (noisy, blurred):
        ours_p = psnr(to_t(ref), to_t(other), data_range=1.0)
        ours_s = ssim(to_t(ref), to_t(other), data_range=1.0)
        for i in range(len(ref)):
            assert ours_p[i].item() == pytest.approx(
                skm.peak_signal_noise_ratio(ref[i], other[i], data_range=1.0), rel=1e-9)
            theirs = skm.structural_similarity(ref[i], other[i], data_range=1.0, channel_axis=-1,
                                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            assert ours_s[i].item() == pytest.approx(theirs, abs=1e-6)


def test_evaluate_reconstruction_identity_and_degraded():
    x = torch.from_numpy(_photos(64)).permute(0, 3, 1, 2).float() * 2 - 1
    x = quantize(x)
    net = load_feature_network()

    class Identity:
        def reconstruct(self, images):
            return images

    m, proto = evaluate_reconstruction(Identity(), x, net, batch_size=2)
    assert m["rFD-EffNetLite0"] == pytest.approx(0.0, abs=1e-6)
    assert m["SSIM"] == pytest.approx(1.0) and m["PD-EffNetLite0"] == pytest.approx(0.0, abs=1e-6)
    assert proto.num_samples == 4 and proto.feature_network == "EffNetLite0" and "FID" not in str(m)
    noisy, _ = evaluate_reconstruction(lambda t: t + 0.2 * torch.randn_like(t), x, net, batch_size=4)
    assert noisy["PSNR"] < 25 and noisy["SSIM"] < 0.9 and noisy["rFD-EffNetLite0"] > 0
    assert noisy["PD-EffNetLite0"] > 0


def test_codebook_usage_and_perplexity():
    u = codebook_usage(np.arange(16).repeat(5), 16)
    assert u["usage"] == 1.0 and u["perplexity"] == pytest.approx(16.0)
    u = codebook_usage(torch.zeros(4, 8, 8, dtype=torch.long), 1024)
    assert u["used"] == 1 and u["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        codebook_usage([5], 4)


def test_per_position_ce_accumulates_like_a_direct_computation():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5, 11), torch.randint(0, 11, (6, 5))
    direct = torch.stack([torch.nn.functional.cross_entropy(logits[:, t], targets[:, t]) for t in range(5)])
    acc = PositionLoss(5)
    acc.update(logits[:2], targets[:2])
    acc.update(logits[2:], targets[2:])
    torch.testing.assert_close(torch.tensor(acc.compute()["per_position"], dtype=torch.float64), direct.double())
    torch.testing.assert_close(per_position_ce(logits, targets), direct.double())


def test_uniformity_measures():
    assert gini(np.ones(10)) == pytest.approx(0.0) and gini([0, 0, 0, 1]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2).astype(float)
    clustered = np.concatenate([rng.normal(0, 0.1, (350, 2)), rng.uniform(0, 20, (50, 2))])
    u, c = density_uniformity(grid), density_uniformity(clustered)
    assert u["gini"] < c["gini"] and u["normalized_entropy"] > c["normalized_entropy"]
    assert u["density_cv"] < c["density_cv"]
    pytest.importorskip("sklearn")  # t-SNE; scikit-learn is an optional dependency
    z = torch.randn(150, 8, 4, 4)
    out = latent_uniformity(z, num=150)
    assert 0 < out["normalized_entropy"] <= 1 and 0 <= out["gini"] < 1
