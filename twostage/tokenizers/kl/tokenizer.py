"""A trained KL-VAE for inference: continuous latents in, images out.

    tok = KLTokenizer.from_pretrained("runs/kl_f16d32", device="cuda")
    z = tok.encode(images)          # (N, d, h, w) float32 posterior means; images in [-1, 1] (N, C, H, W)
    images = tok.decode(z)          # (N, C, H, W) in [-1, 1]

Latents are the posterior mean, not a sample: with the KL weight at 1e-6 the two barely differ, and
the mean makes a cache deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

from twostage.tokenizers.base import CacheLayout, Tokenizer
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel


class KLTokenizer(Tokenizer):
    kind = "kl"
    config_class = KLRunConfig
    model_class = KLModel

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    def cache_layout(self) -> CacheLayout:
        h, w = self.grid_size()
        d = self.latent_channels
        return CacheLayout("latents", (d, h, w), np.dtype(np.float16), {"channels": d}, channel_stats=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Posterior means (N, d, h, w) float32."""
        with self.autocast(precision):
            posterior = self.model.encode(self.prepare(images))
        return posterior.mode().float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, d, h, w) latents (not normalized) -> images (N, C, H, W) in [-1, 1]."""
        z = codes.to(self.device, torch.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (N, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        with self.autocast(precision):
            return self.model.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with self.autocast(precision):
            return self.model(self.prepare(images), sample=False).recon.float().clamp(-1, 1)


__all__ = ["KLTokenizer"]
