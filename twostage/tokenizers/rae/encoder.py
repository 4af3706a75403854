"""RAE's frozen representation encoder: a pretrained feature network's map on the latent grid (docs/methods.md (7.10)).

    enc = RepresentationEncoder(cfg.model.encoder)      # effnet-lite0 offline, or dinov2 from a local file
    z = enc(images, grid=(8, 8))                        # (N, C, 8, 8) float32, no gradients

Any network of twostage/backbones serves (the `feature_maps(images, size)` interface). The map is chosen
and put on the grid by the VF loss's adapter (twostage/tokenizers/kl/vf_loss.py, `FoundationFeatures`):
images go in at grid x the map's stride pixels, and the map is resampled only if it still misses the
grid. RAE then standardizes each position over channels without affine (its DINOv2 encoder is the last
block followed by a LayerNorm with the affine removed), so every latent token has unit RMS whatever the
network: the scale the training noise tau = 0.8 is set for.

The encoder never trains, so it must not be saved, averaged or optimized with the decoder: the model
holds it in a `FrozenRef`, outside its module tree (twostage/tokenizers/rae/model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twostage.config import ConfigError
from twostage.tokenizers.kl.vf_loss import FoundationFeatures
from twostage.tokenizers.rae.config import DINOV2_HELP, RAEEncoderConfig


class FrozenRef:
    """A module kept outside its owner's module tree: not in state_dict, parameters() or buffers(), so
    checkpoints, optimizers and the EMA never see it; a deep copy (the EMA's) shares it, not copies it."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> FrozenRef:
        return self


def load_network(cfg: RAEEncoderConfig) -> nn.Module:
    """The configured feature network (a missing DINOv2 file raises a WeightsNotFoundError, a UserError
    whose message names the file and where to get it)."""
    from twostage.backbones import load_feature_network
    from twostage.backbones.base import WeightsMismatchError, WeightsNotFoundError

    try:
        return load_feature_network(cfg.network, None if cfg.weights is None else str(cfg.weights))
    except (WeightsNotFoundError, WeightsMismatchError) as err:  # say which setting, and RAE's own file
        first = str(err).splitlines()[0].rstrip(".")
        raise type(err)(f"model.encoder.weights: {first}. {DINOV2_HELP}") from None


class RepresentationEncoder(nn.Module):
    """forward(images in [-1, 1] (N, 3|1, H, W), grid (h, w)) -> (N, C, h, w) float32 latents, frozen."""

    def __init__(self, cfg: RAEEncoderConfig, network: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        network = load_network(cfg) if network is None else network
        try:
            self.features = FoundationFeatures(network, layer=cfg.layer, input_size=cfg.input_size,
                                               resample=cfg.resample)
        except ValueError as err:  # a layer index the network does not have
            raise ConfigError(f"model.encoder.layer={cfg.layer}: {err}".replace("vf.layer", "the layer")) from None
        self.channels = self.features.channels
        self.stride = self.features.stride
        self.name = str(getattr(network, "name", type(network).__name__))
        self.checksum = str(getattr(network, "checksum", ""))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> RepresentationEncoder:  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    def input_size(self, grid: tuple[int, int]) -> int:
        """Pixels the network sees for a latent grid."""
        return self.features.size_for(grid)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        z = self.features(images, tuple(grid)).float()  # (N, C, h, w), resampled onto the grid if needed
        if self.cfg.layer_norm:
            z = F.layer_norm(z.permute(0, 2, 3, 1), (z.shape[1],), eps=self.cfg.layer_norm_eps).permute(0, 3, 1, 2)
        return z.contiguous()


__all__ = ["FrozenRef", "RepresentationEncoder", "load_network"]
