"""Frozen pretrained networks: the bottom layer that metrics/ and tokenizers/ (losses) build on.

Nothing here imports from metrics/ or tokenizers/; both import their networks from here, so a new
network is one module plus one entry in `FEATURE_NETWORKS`, and no metric or loss changes.

    base.py           FrozenNetwork / FeatureNetwork interface, input convention (to_rgb, resize_square),
                      the weights errors a user can fix
    effnet_lite0.py   EfficientNet-Lite0, the offline default (its weights ship as a package)
    inception.py      FID Inception-v3 from a local pytorch-fid or TorchScript weights file
    dinov2.py         DINOv2 ViT from a local official or timm checkpoint
    lpips_vgg.py      LPIPS-VGG16 trunk + heads; feature maps only (perceptual loss), no pooled features

Every network takes float images in [-1, 1], (N, 3|1, H, W), resizes them itself, and records the
sha256 of its weights file as `checksum`.
"""

from __future__ import annotations

import os
from typing import Callable

from twostage.backbones.base import FeatureNetwork
from twostage.backbones.dinov2 import load_dinov2
from twostage.backbones.effnet_lite0 import EffNetLite0
from twostage.backbones.inception import load_inception
from twostage.config import ConfigError

__all__ = ["FEATURE_NETWORKS", "DEFAULT_FEATURE_NETWORK", "load_feature_network"]

DEFAULT_FEATURE_NETWORK = "effnet-lite0"

# name -> loader(weights file or None) -> frozen FeatureNetwork on CPU
FEATURE_NETWORKS: dict[str, Callable[[str | os.PathLike | None], FeatureNetwork]] = {
    "effnet-lite0": EffNetLite0,
    "inception-v3": load_inception,
    "dinov2": load_dinov2,
}
# other accepted spellings (after lower-casing and "_" -> "-") -> name
_ALIASES = {
    "effnetlite0": "effnet-lite0",
    "efficientnet-lite0": "effnet-lite0",
    "inception": "inception-v3",
    "inceptionv3": "inception-v3",
    "fid-inception": "inception-v3",
}


def _key(name: str) -> str:
    """The `FEATURE_NETWORKS` key a user's spelling means (unknown names come back normalised)."""
    key = name.lower().replace("_", "-")
    if key.startswith("dinov2"):  # "dinov2-vitl14" etc.: the variant is read from the weights file
        return "dinov2"
    return _ALIASES.get(key, key)


def load_feature_network(name: str = DEFAULT_FEATURE_NETWORK, weights: str | os.PathLike | None = None
                         ) -> FeatureNetwork:
    """Build a frozen feature network on CPU (move it with `.to(device)`).

    name: "effnet-lite0" (default, offline), "inception-v3" (needs `weights`: pytorch-fid's
    `pt_inception-2015-12-05-*.pth` state dict or the TorchScript `inception-2015-12-05.pt`),
    "dinov2" (needs `weights`: an official `dinov2_vit*14*_pretrain.pth` or timm checkpoint).
    """
    loader = FEATURE_NETWORKS.get(_key(name))
    if loader is None:
        raise ConfigError(f"unknown feature network {name!r}; choose one of {', '.join(FEATURE_NETWORKS)} "
                          f"({DEFAULT_FEATURE_NETWORK} is the offline default; the others need a local "
                          f"weights file)")
    return loader(weights)
