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


def _uint8_photos(size=128):
    from skimage.transform import resize

    imgs = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]
    return np.stack([np.round(resize(i, (size, size), anti_aliasing=True) * 255) for i in imgs]).astype(np.uint8)


def _jpeg(images, quality=15):
    import io

    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def _gaussian_blur(images, sigma=1.5):
    from scipy.ndimage import gaussian_filter

    return np.clip(np.rint(gaussian_filter(images.astype(np.float64), (0, sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _as_model_images(u8):  # uint8 NHWC -> [-1, 1] NCHW, as the data layer delivers them
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class _Fixed:
    """A 'tokenizer' whose reconstructions are given images (one batch holds the whole set)."""

    def __init__(self, u8):
        self.out = _as_model_images(u8)

    def reconstruct(self, images):
        assert images.shape == self.out.shape
        return self.out


class _TinyNet(torch.nn.Module):
    """A stand-in feature network: rFD is not under test here, PSNR and SSIM are."""

    name = "Tiny"

    def forward(self, x):
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)}

    def protocol(self):
        return {"feature_network": self.name, "feature_checksum": "0" * 64}


@pytest.mark.parametrize("degrade", [_jpeg, _gaussian_blur], ids=["jpeg", "blur"])
def test_evaluate_reconstruction_ssim_psnr_match_scikit_image_on_uint8_photos(degrade):
    # Through evaluate_reconstruction, on real photos degraded the way tokenizers degrade them. Before
    # the fix SSIM was computed on [-1, 1] images with data range 2 (JPEG: 0.7650 vs 0.7874 here).
    ref = _uint8_photos()
    rec = degrade(ref)
    m, proto = evaluate_reconstruction(_Fixed(rec), _as_model_images(ref), _TinyNet(), batch_size=len(ref),
                                       perceptual=False, progress=False)
    theirs = [skm.structural_similarity(r, o, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False) for r, o in zip(ref, rec)]
    assert 0.5 < np.mean(theirs) < 0.95  # a real degradation, not a trivial case
    assert m["SSIM"] == pytest.approx(np.mean(theirs), abs=1e-6)
    mse = np.mean([skm.mean_squared_error(r, o) for r, o in zip(ref, rec)])  # in uint8 units
    assert m["PSNR"] == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-9)  # PSNR of the mean MSE
    assert "mean MSE" in proto.extra["psnr"] and "[0,1]" in proto.extra["ssim"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ssim(_as_model_images(ref), _as_model_images(rec), data_range=2.0)  # [-1, 1] input is refused


def test_psnr_of_exact_reconstructions_is_inf_and_does_not_dominate_the_set():
    ref = _uint8_photos(64)
    noisy = np.clip(ref.astype(int) + np.random.default_rng(0).integers(-8, 9, ref.shape), 0, 255).astype(np.uint8)
    half = noisy.copy()
    half[:2] = ref[:2]  # two exact reconstructions
    per_image = psnr(_as_model_images(ref), _as_model_images(half))
    assert torch.isinf(per_image[:2]).all() and torch.isfinite(per_image[2:]).all()  # not a clamped 206 dB
    net = _TinyNet()
    exact, _ = evaluate_reconstruction(lambda t: t, _as_model_images(ref), net, perceptual=False, progress=False)
    assert exact["PSNR"] == float("inf") and exact["SSIM"] == pytest.approx(1.0)
    m, _ = evaluate_reconstruction(_Fixed(half), _as_model_images(ref), net, batch_size=4, perceptual=False,
                                   progress=False)
    mse = np.mean([skm.mean_squared_error(r, o) for r, o in zip(ref, half)])
    assert m["PSNR"] == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-9)
    assert 30 < m["PSNR"] < 50  # about 3 dB above the all-noisy set, nowhere near 100+


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
