"""A trained VQ tokenizer for inference: code ids in, images out.

    tok = VQTokenizer.from_pretrained("runs/vq_f8", device="cuda")
    ids = tok.encode(images)        # (N, h, w) int64; images float [-1, 1] (N, C, H, W)
    images = tok.decode(ids)        # (N, C, H, W) in [-1, 1]; (N, h*w) ids of a square grid work too
"""

from __future__ import annotations

import torch

from twostage.data.token_cache import token_dtype
from twostage.tokenizers.base import CacheLayout, Tokenizer
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.model import VQModel


class VQTokenizer(Tokenizer):
    kind = "vq"
    config_class = VQRunConfig
    model_class = VQModel

    @property
    def codebook_size(self) -> int:
        return self.model.codebook_size

    def cache_layout(self) -> CacheLayout:
        h, w = self.grid_size()
        return CacheLayout("tokens", (h * w,), token_dtype(self.codebook_size), {"codebook_size": self.codebook_size})

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> code indices (N, h, w) int64 (the lookup itself is always fp32)."""
        with self.autocast(precision):
            return self.model.encode(self.prepare(images)).indices

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, h, w) (or (N, h*w) with a square grid) code indices -> images (N, C, H, W) in [-1, 1]."""
        indices = codes.to(self.device, torch.int64)
        if indices.ndim == 2:
            side = int(round(indices.shape[1] ** 0.5))
            if side * side != indices.shape[1]:
                raise ValueError(f"cannot infer a square grid from {indices.shape[1]} tokens; pass (N, h, w)")
            indices = indices.view(-1, side, side)
        if int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size:
            raise ValueError(f"code indices must lie in [0, {self.codebook_size})")
        with self.autocast(precision):
            return self.model.decode_indices(indices).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with self.autocast(precision):
            return self.model(self.prepare(images)).recon.float().clamp(-1, 1)


__all__ = ["VQTokenizer"]
