"""What every frozen pretrained network shares: freezing, the input convention, identity, errors.

Every metric that compares image distributions (FD, sFD, IS, precision/recall, rFD) or images
(perceptual distance), and every loss that borrows a pretrained network (perceptual loss, VF
alignment), is only comparable between runs that used the *same* network, the *same* weights and the
*same* preprocessing. So a `FeatureNetwork` carries:

- `name`      "EffNetLite0", "InceptionV3", "DINOv2-ViT-L14", ...: metric names derive from it
              (FD-EffNetLite0; only Inception-v3 earns the name "FID").
- `checksum`  sha256 of the weights file it was loaded from.
- `input_size` and a preprocessing description (`protocol()`), which are part of every result.

Input convention everywhere: float images in [-1, 1], shape (N, 3, H, W) (N, 1, H, W is accepted
and repeated to RGB, for grayscale data such as Fashion-MNIST). The network resizes itself.

Networks are frozen (`FrozenNetwork`): eval mode, no parameter gradients, and `train()` is a no-op,
so that a tokenizer holding one as a loss submodule cannot flip its BatchNorms into training mode.
Gradients still flow to the *images* through `feature_maps` (perceptual losses need that).

Weights are local files (nothing is downloaded). A missing or wrong file is the user's to fix, so it
raises a `ConfigError` subclass (a `UserError`) whose message says where to get the right file and
how to pass it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from twostage.config import ConfigError

__all__ = ["WeightsNotFoundError", "WeightsMismatchError", "FrozenNetwork", "FeatureNetwork", "to_rgb",
           "resize_square"]


class WeightsNotFoundError(ConfigError, FileNotFoundError):
    """No weights file was given, or its path does not exist."""


class WeightsMismatchError(ConfigError):
    """The weights file exists but does not hold the network it was given for."""


def to_rgb(images: Tensor) -> Tensor:
    """(N,1,H,W) -> (N,3,H,W); (N,3,H,W) unchanged; anything else is an error worth naming."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"feature networks take images shaped (N, 3, H, W) or (N, 1, H, W) in [-1, 1], got "
            f"{tuple(images.shape)}; convert NHWC arrays with .permute(0, 3, 1, 2)"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize_square(images: Tensor, size: int, mode: str = "bilinear", antialias: bool = True) -> Tensor:
    """Resize to size x size (non-square inputs are squashed, not cropped: a protocol choice).

    Antialiasing matters when *down*sampling (e.g. 256 -> 224): without it, aliasing adds
    high-frequency artefacts that the feature network sees and FD reacts to (Parmar et al. 2022,
    clean-fid, arXiv:2104.11222). Upsampling (32 px images to a perceptual loss's 128 or a metric's 224)
    gives the same values either way (to float rounding): there the plain kernel runs, which a compiled
    training step can fuse; the antialiased one's forward alone (two calls per step: reconstruction and
    target) was 1.3% of a study tokenizer's GPU time on an H200
    (results/throughput/2026-12-02/profile/alone_baseline.txt).
    """
    if images.shape[-2:] == (size, size):
        return images
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    downsampling = size < images.shape[-2] or size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode=mode, antialias=antialias and downsampling, **kw)


class FrozenNetwork(nn.Module):
    """A pretrained network that never trains: see the module docstring for why."""

    checksum: str

    def freeze(self) -> FrozenNetwork:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> FrozenNetwork:  # noqa: ARG002 - frozen on purpose
        # Always eval: BatchNorm statistics and dropout must never change.
        return super().train(False)

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:  # pragma: no cover
        """Intermediate (N, C, h, w) maps for perceptual losses, differentiable w.r.t. `images`.
        `size`: resize target (None: the network's default; pass the images' own size to skip resizing)."""
        raise NotImplementedError


class FeatureNetwork(FrozenNetwork):
    """A frozen image-feature network for metrics. Subclasses set name/checksum/input_size and implement
    `forward` -> {"pool": (N,D), "spatial": (N,D_s), ["logits": (N,K)]} and `feature_maps`."""

    name: str
    input_size: int
    preprocessing: str = ""

    def protocol(self) -> dict:
        """What a result must record about this network (merged into the protocol record)."""
        return {
            "feature_network": self.name,
            "feature_checksum": self.checksum,
            "feature_input_size": self.input_size,
            "feature_preprocessing": self.preprocessing,
        }

    def forward(self, images: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def features_and_maps(self, images: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """`forward`'s features and `feature_maps` at the network's input size, as the two calls give them;
        a network that can take both from one pass overrides this (reconstruction metrics need both of
        every image: rFD and the perceptual distance)."""
        return self(images), self.feature_maps(images)
