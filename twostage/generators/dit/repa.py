"""REPA (Yu et al., arXiv 2410.06940): representation alignment of one DiT block's tokens.

With h_k (N, T, width) the tokens after block k (1-based, `repa.layer`) at the noisy input x_t, g a
trained projector MLP (width -> projector_dim -> projector_dim -> D, SiLU between; REPA's three linear
layers) and f (N, T, D) a frozen encoder's features of the *clean* image on the DiT's token grid:

    L_repa = - mean_{n, i} cos(g(h_k)_{n,i}, f_{n,i})          (in [-1, 1]; -1 = aligned)
    L      = L_flow + lambda * L_repa  while step < stop_step   (lambda = 0.5; stop_step None = always)

The stop step is HASTE's early termination of the alignment (after it the decoder and encoder passes
are skipped too).

Where the clean image comes from: the DiT trains on a latent cache, which holds latents and labels,
not images. The image is the cache's tokenizer *decoding the clean latent* x_1 (de-normalized), so
this is REPA with a frozen VAE decoder in front of the encoder: it differs from REPA on pixels, which
encodes the original image, by the tokenizer's reconstruction error (the encoder sees what the
generator can at best produce). No data change; it costs one decoder and one encoder forward per
step, both frozen and without gradients.

Features on the token grid (`FoundationFeatures`, shared with VA-VAE's VF loss): the encoder's spatial
feature map (EfficientNet-Lite0: the stride-16 map, 112 channels; DINOv2: the last block's patch
tokens), fed at token grid x the map's stride pixels so it lands on the grid (DINOv2/14 on 16x16 tokens:
224 px, REPA's setting), area-pooled (or bilinearly grown) to the grid when it does not. The pooled
(global) feature is never used: REPA aligns token by token.

Where the projector lives: a module of its own, "repa", next to "dit" in the task's modules, trained by
the same optimizer ("dit"); it is in the raw checkpoint, has no EMA, and is not part of the generator
(load_run, sampling, model.json's parameter count and FLOPs are those of the DiT alone, as REPA drops
the projector after training). A run without REPA has no "repa" module: its checkpoints are unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from twostage.tokenizers.kl.vf_loss import FoundationFeatures, build_foundation

Decode = Callable[[torch.Tensor], torch.Tensor]  # de-normalized latents -> images in [-1, 1]


class Projector(nn.Module):
    """REPA's projector: Linear(width, d) SiLU Linear(d, d) SiLU Linear(d, features), token-wise."""

    def __init__(self, width: int, hidden: int, features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, features))
        for m in self.net:
            if isinstance(m, nn.Linear):  # DiT / REPA init: xavier weights, zero biases
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def flops_per_token(self) -> float:
        """Matmul FLOPs of one token's forward pass (2 per multiply-add), the DiT's convention."""
        return float(sum(2 * m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear)))


def repa_loss(projected: torch.Tensor, features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-cos(projected, features) over the last axis, mean over tokens and batch; (N, T, D) each; float32."""
    if projected.shape != features.shape:
        raise ValueError(f"projected tokens {tuple(projected.shape)} and features {tuple(features.shape)} differ")
    return -F.cosine_similarity(projected.float(), features.float(), dim=-1, eps=eps).mean()


def repa_active(step: int, stop_step: int | None) -> bool:
    """Whether the term is on at `step` (0-based): always without a stop step, else before it."""
    return stop_step is None or step < stop_step


class RepaTargets:
    """Frozen targets f (N, T, D) of clean latents: decode, then the encoder's map on the token grid.

    `decoder(device)` makes the decoder once, at the first step (it must succeed: unlike the checkpoint
    grids, REPA cannot train without it). Neither network is checkpointed; both run without gradients.
    """

    def __init__(self, features: FoundationFeatures, decoder: Callable[[torch.device], Decode | None],
                 grid: tuple[int, int]) -> None:
        self.features, self.grid = features, tuple(grid)
        self.channels = features.channels
        self._factory = decoder
        self._decode: Decode | None = None
        self._device: torch.device | None = None

    @classmethod
    def build(cls, encoder: str, weights, decoder: Callable[[torch.device], Decode | None],
              grid: tuple[int, int], network: nn.Module | None = None) -> RepaTargets:
        """From a feature network's name (twostage.backbones) or a given `network` (tests use stand-ins).
        Built in a forked RNG: a network's random init before its weights load leaves the training
        stream untouched."""
        with torch.random.fork_rng(devices=[]):
            features = FoundationFeatures(network) if network is not None else build_foundation(encoder, weights)
        return cls(features, decoder, grid)

    def _on(self, device: torch.device) -> Decode:
        if self._decode is None:
            self._decode = self._factory(device)
            if self._decode is None:
                raise RuntimeError("repa.enabled needs the cache's tokenizer to decode latents, and there is none")
        if self._device != device:
            self.features.to(device)
            self._device = device
        return self._decode

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """De-normalized latents (N, C, h, w) -> features (N, T, D) float32, T row-major on the token grid."""
        decode = self._on(latents.device)
        images = decode(latents).float().clamp(-1, 1)
        maps = self.features(images, self.grid)  # (N, D, gh, gw) float32
        return maps.flatten(2).transpose(1, 2)


__all__ = ["Projector", "RepaTargets", "repa_loss", "repa_active"]
