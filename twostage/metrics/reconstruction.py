"""Reconstruction metrics of a tokenizer: rFD, PSNR, SSIM and an LPIPS-style perceptual distance.

rFD compares the reconstructions of the validation split with *that same split* (docs/methods.md §8 "Reconstruction"; LlamaGen arXiv:2406.06525:
against the generation reference batch instead, LlamaGen's 2.19 becomes 4.28).
Reconstructions are clamped to [-1, 1] and quantized to uint8 before any metric, exactly as if
they had been saved as PNGs, so the numbers do not depend on whether a pipeline saves images.
PSNR (per image, then averaged; data range 1 on [0,1] images) and SSIM (Wang et al. 2004, IEEE TIP
13(4); Gaussian window 11, sigma 1.5, K=(0.01, 0.03), per channel then averaged: torchmetrics,
matching scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`).
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

__all__ = ["Reconstructor", "psnr", "ssim", "perceptual_distance", "quantize", "evaluate_reconstruction"]


class Reconstructor(TypingProtocol):
    def reconstruct(self, images: Tensor) -> Tensor: ...


def quantize(images: Tensor) -> Tensor:
    """[-1,1] float -> the float image its uint8 PNG would load back as (still in [-1,1])."""
    u8 = torch.floor((images.clamp(-1, 1) + 1.0) * 127.5 + 0.5)
    return u8 / 127.5 - 1.0


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB of (N, C, H, W) tensors (default range 2: images in [-1, 1])."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def ssim(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image SSIM of (N, C, H, W) tensors (Gaussian 11x11, sigma 1.5), averaged over channels.

    torchmetrics computes the SSIM map; its mean (torchmetrics 1.9) includes the 5-pixel border,
    where the window reaches into reflection padding. scikit-image and the original SSIM code
    average only where the window lies inside the image, so the border is cropped here first."""
    from torchmetrics.functional.image import structural_similarity_index_measure as _ssim

    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    _, full = _ssim(a.double(), b.double(), gaussian_kernel=True, sigma=1.5, kernel_size=11,
                    data_range=data_range, k1=0.01, k2=0.03, reduction="none", return_full_image=True)
    pad = 5  # (kernel 11 - 1) / 2
    if full.shape[-2:] == a.shape[-2:]:
        full = full[..., pad:-pad, pad:-pad]
    return full.flatten(1).mean(1)


def perceptual_distance(net: FeatureNetwork, a: Tensor, b: Tensor, size: int | None = None) -> Tensor:
    """LPIPS-shaped distance on `net.feature_maps`, per image (N,)."""
    d = torch.zeros(a.shape[0], device=a.device)
    for fa, fb in zip(net.feature_maps(a, size), net.feature_maps(b, size)):
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
) -> tuple[dict[str, float], Protocol]:
    """Reconstruct `dataset` (Dataset of (image, label), (N,C,H,W) tensor in [-1,1], or iterable of
    batches) with `tokenizer.reconstruct` and compare. `net` defaults to EffNet-Lite0.

    precision applies to the tokenizer forward and the feature network ("fp32" or "bf16")."""
    net = (net or load_feature_network()).to(device)
    device = torch.device(device)
    rec_fn = tokenizer.reconstruct if hasattr(tokenizer, "reconstruct") else tokenizer
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    real_f, rec_f, psnrs, ssims, pds = [], [], [], [], []
    seen = 0
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
        psnrs.append(psnr(x, y).cpu())
        ssims.append(ssim(x, y).cpu())
        with torch.autocast(**amp):
            fx, fy = net(x), net(y)
            if perceptual:
                pds.append(perceptual_distance(net, x, y).float().cpu())
        real_f.append(fx["pool"].float().cpu())
        rec_f.append(fy["pool"].float().cpu())
    if seen < 2:
        raise ValueError("need at least 2 images to evaluate reconstruction")
    sr = feature_stats(torch.cat(real_f).double().numpy())
    sy = feature_stats(torch.cat(rec_f).double().numpy())
    metrics = {
        metric_name("rfd", net.name): frechet_distance(sy.mu, sy.sigma, sr.mu, sr.sigma),
        "PSNR": float(torch.cat(psnrs).mean()),
        "SSIM": float(torch.cat(ssims).mean()),
    }
    if perceptual:
        metrics[f"PD-{net.name}"] = float(torch.cat(pds).mean())
    proto = Protocol(num_samples=seen, label_sampling="none (reconstructions of every image)",
                     sampler="reconstruction", precision=precision, reference=reference,
                     device=device_description(device)).with_network(net)
    proto.extra.update(protocol or {})
    return metrics, proto
