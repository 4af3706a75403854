"""The Representation Autoencoder (RAE, arXiv:2510.11690): frozen encoder, noise augmentation, ViT decoder,
per-channel latent normalization (docs/methods.md §7, (7.10)-(7.12)).

    model = RAEModel(cfg.model)                 # builds the frozen encoder from the config
    out = model(x)                              # training: recon of z + sigma * eps; out.latent = clean z
    z = model.encode(x)                         # normalized latents, what a cache stores
    x_hat = model.decode(z)                     # from normalized latents

Only the decoder and the normalization statistics are the model's state (`state_dict`): the encoder is
rebuilt from its config (EfficientNet-Lite0's packaged weights, or the DINOv2 file) and held in a
`FrozenRef`, so a checkpoint holds no copy of it and the EMA shares the one instance. `_apply` still
carries it along, so `.to(device)`, `.float()` and the channels-last layout move encoder and decoder
together.

Normalization: `latent_mean` / `latent_std` (per channel, float32 buffers in the weights file) start as
the identity; a run fills them once from training images (twostage/tokenizers/rae/task.py) and
`latent_stats_images` records from how many. Training never passes through them (encode normalizes,
decode undoes it first), so they change only what `encode` returns and `decode` takes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from twostage.tokenizers.conv import latent_grid
from twostage.tokenizers.rae.config import RAEModelConfig
from twostage.tokenizers.rae.decoder import ViTDecoder
from twostage.tokenizers.rae.encoder import FrozenRef, RepresentationEncoder


def noise_augment(z: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z + sigma * eps, sigma) with sigma ~ U(0, tau) drawn per image (N,) and eps ~ N(0, I)
    (docs/methods.md (7.10)): the decoder learns to read latents off the encoder's exact outputs, as a
    generator's samples will be."""
    sigma = tau * torch.rand(z.shape[0], generator=generator, device=z.device, dtype=torch.float32)
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
    return (z.float() + sigma.view(-1, *([1] * (z.ndim - 1))) * eps).to(z.dtype), sigma


class RAEOutput(NamedTuple):
    recon: torch.Tensor  # (N, C_out, H, W)
    latent: torch.Tensor  # (N, C, h, w): the clean (not noised, not normalized) encoder output
    sigma: torch.Tensor  # (N,): the noise level each image's latent got (zeros without noise)


class RAEModel(nn.Module):
    def __init__(self, cfg: RAEModelConfig, network: nn.Module | None = None, image_size: int | None = None) -> None:
        """`network`: a feature network to use instead of building the configured one (the task passes
        the perceptual loss's copy when both are the same network; tests pass tiny stand-ins).
        `image_size`: the training size, whose grid gets the decoder's precomputed position table."""
        super().__init__()
        self.cfg = cfg
        encoder = RepresentationEncoder(cfg.encoder, network)
        self._encoder = FrozenRef(encoder)
        c = encoder.channels
        self.latent_channels = c
        grid = latent_grid(image_size, cfg.patch_size) if image_size else (16, 16)
        self.decoder = ViTDecoder(c, cfg.out_channels, cfg.patch_size, grid, cfg.decoder)
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))
        self.register_buffer("latent_stats_images", torch.zeros((), dtype=torch.long))

    # -- the frozen encoder rides along with device / dtype moves, outside the module tree ---------------

    @property
    def encoder(self) -> RepresentationEncoder:
        return self._encoder.module

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if recurse:
            self.encoder._apply(fn)
        return self

    # -- shapes ------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return self.cfg.patch_size

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        return latent_grid(image_size, self.downsample_factor)

    # -- normalization (docs/methods.md (7.12)) -------------------------------------------------------------

    @property
    def has_latent_stats(self) -> bool:
        return bool(self.latent_stats_images.item() > 0)

    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor, images: int) -> None:
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"latent statistics must have {self.latent_channels} channels, got "
                             f"{tuple(mean.shape)} / {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("latent standard deviations must be positive")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.latent_stats_images.fill_(int(images))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    # -- encode / decode ---------------------------------------------------------------------------------

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """The clean encoder output (N, C, h, w) float32 of images x (N, 3, H, W) in [-1, 1]; no gradients."""
        return self.encoder(x, self.grid_size((x.shape[-2], x.shape[-1])))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized latents (N, C, h, w) float32: what a stage-2 cache stores."""
        return self.normalize(self.encode_features(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, C_out, H, W), unclamped, from normalized latents."""
        return self.decoder(self.denormalize(z))

    def forward(self, x: torch.Tensor, noise: bool | None = None) -> RAEOutput:
        """Reconstruct x; `noise` (default: in training mode, with noise_tau > 0) adds (7.10) to the latent."""
        z = self.encode_features(x)
        noise = self.training if noise is None else noise
        if noise and self.cfg.noise_tau > 0:
            z_in, sigma = noise_augment(z, self.cfg.noise_tau)
        else:
            z_in, sigma = z, z.new_zeros(z.shape[0])
        return RAEOutput(self.decoder(z_in), z, sigma)


__all__ = ["RAEModel", "RAEOutput", "noise_augment"]
