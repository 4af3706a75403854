"""A trained RAE for inference: normalized continuous latents in, images out (docs/methods.md (7.10)-(7.12)).

    tok = RAETokenizer.from_pretrained("runs/rae_fmnist", device="cuda")
    z = tok.encode(images)          # (N, C, h, w) float32, normalized by the run's training statistics
    images = tok.decode(z)          # (N, C_out, H, W) in [-1, 1]

No noise at inference (sigma = 0): encode is the frozen encoder's exact output, normalized; the cache
of it is a "latents" cache like a KL-VAE's, so the DiT trains on it unchanged (it renormalizes with the
cache's own per-channel statistics, which for normalized latents are close to 0 and 1).
"""

from __future__ import annotations

import numpy as np
import torch

from twostage.tokenizers.base import CacheLayout, Tokenizer
from twostage.tokenizers.rae.config import RAERunConfig
from twostage.tokenizers.rae.model import RAEModel


class RAETokenizer(Tokenizer):
    kind = "rae"
    config_class = RAERunConfig
    model_class = RAEModel

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    def cache_layout(self) -> CacheLayout:
        h, w = self.grid_size()
        c = self.latent_channels
        return CacheLayout("latents", (c, h, w), np.dtype(np.float16), {"channels": c}, channel_stats=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Normalized latents (N, C, h, w) float32."""
        with self.autocast(precision):
            return self.model.encode(self.prepare(images)).float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, C, h, w) normalized latents -> images (N, C_out, H, W) in [-1, 1]."""
        z = codes.to(self.device, torch.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (N, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        with self.autocast(precision):
            return self.model.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with self.autocast(precision):
            return self.model(self.prepare(images), noise=False).recon.float().clamp(-1, 1)


__all__ = ["RAETokenizer"]
