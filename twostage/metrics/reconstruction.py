"""Reconstruction metrics of a tokenizer: rFD, PSNR, SSIM and an LPIPS-style perceptual distance.

rFD compares the reconstructions of the validation split with *that same split* (docs/methods.md §8 "Reconstruction"; LlamaGen arXiv:2406.06525:
against the generation reference batch instead, LlamaGen's 2.19 becomes 4.28).
Reconstructions are clamped to [-1, 1] and quantized to uint8 before any metric, exactly as if
they had been saved as PNGs, so the numbers do not depend on whether a pipeline saves images.

PSNR and SSIM are computed on the [0, 1] images (u8 / 255) with data range 1, i.e. exactly what
scikit-image gives on the uint8 images with data range 255:
- PSNR of the set is the PSNR of the mean squared error over all images (average the MSE, then take
  the log): 10 log10(1 / mean_i MSE_i). An exact reconstruction has MSE 0 and per-image PSNR inf;
  averaging per-image PSNRs would let one such image (or a clamp such as 1e-20 -> 206 dB) dominate
  the mean, while the mean MSE stays finite unless every image is exact (then the set's PSNR is inf).
  By Jensen's inequality it is <= the mean of per-image PSNRs that some papers report.
- SSIM (Wang et al. 2004, IEEE TIP 13(4); Gaussian window 11, sigma 1.5, K=(0.01, 0.03), per channel
  then averaged; torchmetrics, matching scikit-image's `structural_similarity(gaussian_weights=True,
  use_sample_covariance=False)`), per image, then averaged. SSIM is not shift-invariant (its
  luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) depends on the absolute level), so it
  must see [0, 1] images: on [-1, 1] images with range 2 mid-grey regions sit near 0 and are
  penalised (on JPEG'd photos 0.7650 instead of scikit-image's 0.7874).
The perceptual distance "PD-<net>" is LPIPS-shaped (Zhang et al. 2018, arXiv:1801.03924, eq. 1:
channel-unit-normalized feature maps, squared difference summed over channels, spatial mean, sum
over layers) but without LPIPS's learned per-channel weights, on the metric feature network; it is
not LPIPS and is named so.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

import torch
from torch import Tensor

from twostage.backbones import load_feature_network
from twostage.backbones.base import FeatureNetwork
from twostage.metrics.frechet import feature_stats, frechet_distance
from twostage.metrics.protocol import Protocol, device_description, metric_name

__all__ = ["Reconstructor", "psnr", "psnr_from_mse", "squared_error", "ssim", "perceptual_distance", "quantize",
           "evaluate_reconstruction", "PSNR_CONVENTION", "SSIM_CONVENTION"]

# What "PSNR" and "SSIM" of evaluate_reconstruction mean; both go into the protocol record.
PSNR_CONVENTION = ("10*log10(1/mean MSE): MSE per image on [0,1] images (uint8/255), averaged over the set "
                   "before the log (an exact set gives inf)")
SSIM_CONVENTION = ("per-image SSIM on [0,1] images (uint8/255), data range 1, Gaussian 11x11 sigma 1.5, "
                   "K=(0.01,0.03), 5-px border cropped (scikit-image), mean over channels then images")


class Reconstructor(TypingProtocol):
    def reconstruct(self, images: Tensor) -> Tensor: ...


def quantize(images: Tensor) -> Tensor:
    """[-1,1] float -> the float image its uint8 PNG would load back as (still in [-1,1])."""
    u8 = torch.floor((images.clamp(-1, 1) + 1.0) * 127.5 + 0.5)
    return u8 / 127.5 - 1.0


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Per-image mean squared error of (N, C, H, W) tensors, float64."""
    return (a.double() - b.double()).square().flatten(1).mean(1)


def psnr_from_mse(mse: Tensor | float, data_range: float = 1.0) -> Tensor:
    """10 log10(range^2 / MSE) in dB; MSE 0 (an exact reconstruction) gives inf, not a clamp."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return torch.where(mse > 0, 10.0 * torch.log10(data_range**2 / mse), torch.full_like(mse, float("inf")))


def _unit_range(quantized: Tensor) -> Tensor:
    """quantize()'d [-1, 1] images -> exactly u8 / 255 in float64."""
    return torch.round((quantized.double() + 1.0) * 127.5) / 255.0


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB of (N, C, H, W) tensors (default range 2: images in [-1, 1]; PSNR is
    shift-invariant, so [-1, 1] with range 2 equals [0, 1] with range 1). Identical images: inf."""
    return psnr_from_mse(squared_error(a, b), data_range)


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM of (N, C, H, W) tensors in [0, data_range] (Gaussian 11x11, sigma 1.5),
    averaged over channels. Images in [-1, 1] must be mapped to [0, 1] first ((x + 1) / 2): SSIM's
    luminance term is not shift-invariant, and negative inputs are refused.

    torchmetrics computes the SSIM map; its mean (torchmetrics 1.9) includes the 5-pixel border,
    where the window reaches into reflection padding. scikit-image and the original SSIM code
    average only where the window lies inside the image, so the border is cropped here first."""
    from torchmetrics.functional.image import structural_similarity_index_measure as _ssim

    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    if min(float(a.min()), float(b.min())) < 0:
        raise ValueError("ssim() takes images in [0, data_range]; map [-1, 1] images to [0, 1] with (x + 1) / 2 "
                         "(SSIM's luminance term is not shift-invariant)")
    _, full = _ssim(a.double(), b.double(), gaussian_kernel=True, sigma=1.5, kernel_size=11,
                    data_range=data_range, k1=0.01, k2=0.03, reduction="none", return_full_image=True)
    pad = 5  # (kernel 11 - 1) / 2
    if full.shape[-2:] == a.shape[-2:]:
        full = full[..., pad:-pad, pad:-pad]
    return full.flatten(1).mean(1)


def perceptual_distance(net: FeatureNetwork, a: Tensor, b: Tensor, size: int | None = None) -> Tensor:
    """LPIPS-shaped distance on `net.feature_maps`, per image (N,)."""
    return map_distance(net.feature_maps(a, size), net.feature_maps(b, size))


def map_distance(maps_a: list[Tensor], maps_b: list[Tensor]) -> Tensor:
    """The LPIPS shape on two images' feature maps: per map, unit-normalize each position's channel
    vector, square the difference, sum over channels and average over positions; sum over maps. (N,)"""
    d = torch.zeros(maps_a[0].shape[0], device=maps_a[0].device)
    for fa, fb in zip(maps_a, maps_b):
        fa = fa.float() / (fa.float().norm(dim=1, keepdim=True) + 1e-10)
        fb = fb.float() / (fb.float().norm(dim=1, keepdim=True) + 1e-10)
        d = d + (fa - fb).square().sum(1).mean(dim=(1, 2))
    return d


def _batches(dataset: Any, batch_size: int):
    if isinstance(dataset, Tensor):
        for i in range(0, len(dataset), batch_size):
            yield dataset[i : i + batch_size]
        return
    if isinstance(dataset, torch.utils.data.Dataset):
        from twostage.data.loader import eval_loader

        dataset = eval_loader(dataset, batch_size, pin_memory=False)
    for batch in dataset:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _num_images(dataset: Any, max_images: int | None) -> int | None:
    """How many images one pass will see, when the source says (for the progress bar)."""
    inner = getattr(dataset, "dataset", dataset)  # a DataLoader's dataset
    try:
        n = len(inner)
    except TypeError:  # a generator of batches
        return max_images
    return n if max_images is None else min(n, max_images)


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: Reconstructor | Callable[[Tensor], Tensor],
    dataset: Any,
    net: FeatureNetwork | None = None,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    max_images: int | None = None,
    perceptual: bool = True,
    reference: str = "validation split",
    protocol: dict | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], Protocol]:
    """Reconstruct `dataset` (Dataset of (image, label), (N,C,H,W) tensor in [-1,1], or iterable of
    batches) with `tokenizer.reconstruct` and compare. `net` defaults to EffNet-Lite0.

    Metrics: rFD-<net>, "PSNR" (dB, of the mean MSE over the set on [0,1] images; inf only when every
    image is exact), "SSIM" (mean of per-image SSIM on [0,1] images, as scikit-image on the uint8
    images) and PD-<net> (when `perceptual`); the conventions are in the module docstring and in the
    protocol's extra["psnr"] / extra["ssim"].
    precision applies to the tokenizer forward and the feature network ("fp32" or "bf16").
    progress: a tqdm bar (images, images/s) on stderr."""
    from tqdm.auto import tqdm

    net = (net or load_feature_network()).to(device)
    device = torch.device(device)
    rec_fn = tokenizer.reconstruct if hasattr(tokenizer, "reconstruct") else tokenizer
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    real_f, rec_f, mses, ssims, pds = [], [], [], [], []
    seen = 0
    bar = tqdm(total=_num_images(dataset, max_images), unit="img", desc="reconstruction metrics",
               disable=not progress, dynamic_ncols=True)
    for x in _batches(dataset, batch_size):
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            x = x[: max_images - seen]
        x = x.to(device, torch.float32)
        seen += x.shape[0]
        with torch.autocast(**amp):
            y = rec_fn(x)
        if y.shape != x.shape:
            raise ValueError(f"reconstruct() returned shape {tuple(y.shape)} for input {tuple(x.shape)}")
        x, y = quantize(x), quantize(y.float())
        x01, y01 = _unit_range(x), _unit_range(y)  # u8 / 255: the [0, 1] images scikit-image would see
        mses.append(squared_error(x01, y01).cpu())
        ssims.append(ssim(x01, y01, data_range=1.0).cpu())
        with torch.autocast(**amp):
            if perceptual:  # one pass per image set gives the rFD features and the maps
                (fx, mx), (fy, my) = net.features_and_maps(x), net.features_and_maps(y)
                pds.append(map_distance(mx, my).float().cpu())
            else:
                fx, fy = net(x), net(y)
        real_f.append(fx["pool"].float().cpu())
        rec_f.append(fy["pool"].float().cpu())
        bar.update(x.shape[0])
    bar.close()
    if seen < 2:
        raise ValueError("need at least 2 images to evaluate reconstruction")
    sr = feature_stats(torch.cat(real_f).double().numpy())
    sy = feature_stats(torch.cat(rec_f).double().numpy())
    metrics = {
        metric_name("rfd", net.name): frechet_distance(sy.mu, sy.sigma, sr.mu, sr.sigma),
        "PSNR": float(psnr_from_mse(torch.cat(mses).mean(), data_range=1.0)),
        "SSIM": float(torch.cat(ssims).mean()),
    }
    if perceptual:
        metrics[f"PD-{net.name}"] = float(torch.cat(pds).mean())
    proto = Protocol(num_samples=seen, label_sampling="none (reconstructions of every image)",
                     sampler="reconstruction", precision=precision, reference=reference,
                     device=device_description(device)).with_network(net)
    proto.extra.update(psnr=PSNR_CONVENTION, ssim=SSIM_CONVENTION)
    proto.extra.update(protocol or {})
    return metrics, proto
