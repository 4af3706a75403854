"""Perceptual loss: an LPIPS-shaped distance on the feature maps of a frozen backbone.

Pixel losses alone give blurry reconstructions; comparing images in a pretrained network's feature
space (Johnson et al. 2016, arXiv:1603.08155) keeps edges and textures. The distance is the one of
LPIPS (Zhang et al. 2018, arXiv:1801.03924, eq. 1):

    d(x, y) = sum_layers mean_hw sum_c w_c * (u(f(x)) - u(f(y)))^2,   u = unit-normalize over channels

with w_c = 1 for plain feature networks (the offline default, EfficientNet-Lite0 with its packaged
ImageNet weights, twostage/backbones/effnet_lite0.py) and w_c the learned LPIPS linear heads for
LPIPS-VGG16 (twostage/backbones/lpips_vgg.py, local weights). Any module with
`feature_maps(images in [-1, 1], size) -> list[(N, C, h, w)]` (differentiable w.r.t. the images) and
optionally `layer_weights() -> list[(1, C, 1, 1)]` serves as backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twostage.backbones import load_feature_network
from twostage.backbones.lpips_vgg import LPIPSVGG
from twostage.config import ConfigError

__all__ = ["PerceptualLoss", "build_perceptual", "PERCEPTUAL_BACKBONES"]


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """Per-image LPIPS-style distance (N,) between `x` (gets gradients) and the target `y`."""

    def __init__(self, backbone: nn.Module, size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.size = size
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # noqa: ARG002 - the backbone stays frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the target side needs no backward: cheaper than one 2N batch
            target_maps = self.backbone.feature_maps(y, self.size)
        maps = self.backbone.feature_maps(x, self.size)
        weights = self.backbone.layer_weights() if hasattr(self.backbone, "layer_weights") else None
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, (a, b) in enumerate(zip(maps, target_maps)):
            # float32: squared unit-vector differences are small and bf16 would round them away.
            diff = (_unit(a.float()) - _unit(b.float())).pow(2)
            if weights is not None:
                per_pos = F.conv2d(diff, weights[i].float())  # (N, 1, h, w) weighted channel sum
            else:
                per_pos = diff.sum(dim=1, keepdim=True)
            total = total + per_pos.mean(dim=(1, 2, 3))
        return total


def _effnet_lite0(weights: str | Path | None, heads: str | Path | None, random_init: bool) -> nn.Module:
    # Its weights ship as a package: the LPIPS-only settings (weights, heads, random_init) do not apply.
    return load_feature_network("effnet-lite0")


def _lpips_vgg(weights: str | Path | None, heads: str | Path | None, random_init: bool) -> nn.Module:
    return LPIPSVGG(weights, heads, random_init=random_init)


# loss.perceptual value -> backbone builder (None: no perceptual term)
PERCEPTUAL_BACKBONES = {"effnet-lite0": _effnet_lite0, "lpips-vgg": _lpips_vgg, "none": None}


def build_perceptual(name: str, *, weights: str | Path | None = None, heads: str | Path | None = None,
                     random_init: bool = False, size: int | None = None) -> PerceptualLoss | None:
    """name: "effnet-lite0" (offline default), "lpips-vgg" (local weights or random_init), "none"."""
    if name not in PERCEPTUAL_BACKBONES:
        raise ConfigError(f"loss.perceptual={name!r}: choose one of {', '.join(PERCEPTUAL_BACKBONES)}")
    build = PERCEPTUAL_BACKBONES[name]
    return None if build is None else PerceptualLoss(build(weights, heads, random_init), size=size)
