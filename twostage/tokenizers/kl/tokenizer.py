"""A trained KL-VAE for inference: continuous latents in, images out.

    tok = KLTokenizer.from_pretrained("runs/kl_f16d32", device="cuda")
    z = tok.encode(images)          # (N, d, h, w) float32 posterior means; images in [-1, 1] (N, C, H, W)
    images = tok.decode(z)          # (N, C, H, W) in [-1, 1]

Latents are the posterior mean, not a sample: with the KL weight at 1e-6 the two barely differ, and
the mean makes a cache deterministic. A converted peer's run may say otherwise (model.encode_posterior:
sample, as LDM and LightningDiT encode for their diffusion models); its noise then comes from the
tokenizer's own generator, seeded on first use; `tokenizer encode` reseeds it per global batch (twostage/
tokenizers/run.py), so a cache repeats exactly for the same images and batch size, with any number of processes.
encode() returns and decode() takes (z - model.shift_factor) * model.scaling_factor (1 and 0 unless a
converted peer's latent scaling is recorded, e.g. SD's 0.18215).
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

    NOISE_SEED = 0  # of the posterior samples when model.encode_posterior is "sample"

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    def _noise(self) -> torch.Generator:
        """The generator of posterior samples: one per tokenizer and device, seeded on first use."""
        gen = getattr(self, "_generator", None)
        if gen is None or gen.device != self.device:
            gen = self._generator = torch.Generator(self.device).manual_seed(self.NOISE_SEED)
        return gen

    def cache_layout(self) -> CacheLayout:
        h, w = self.grid_size()
        d = self.latent_channels
        return CacheLayout("latents", (d, h, w), np.dtype(np.float16), {"channels": d}, channel_stats=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Posterior means (or samples, model.encode_posterior) (N, d, h, w) float32, scaled as the config says."""
        m = self.config.model
        with self.autocast(precision):
            posterior = self.model.encode(self.prepare(images))
        z = posterior.sample(self._noise()) if m.encode_posterior == "sample" else posterior.mode()
        z = z.float()
        if m.shift_factor != 0.0 or m.scaling_factor != 1.0:
            z = (z - m.shift_factor) * m.scaling_factor
        return z

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, d, h, w) latents as encode() returns them (not normalized) -> images (N, C, H, W) in [-1, 1]."""
        m = self.config.model
        z = codes.to(self.device, torch.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (N, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        if m.shift_factor != 0.0 or m.scaling_factor != 1.0:
            z = z / m.scaling_factor + m.shift_factor
        with self.autocast(precision):
            return self.model.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with self.autocast(precision):
            return self.model(self.prepare(images), sample=False).recon.float().clamp(-1, 1)


__all__ = ["KLTokenizer"]
