"""VQ autoencoder of the LlamaGen VQ-16 family: the conv trunk (twostage/tokenizers/conv.py), a 1x1
projection to the code dimension, the vector quantizer, and the mirror-image decoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from twostage.tokenizers.conv import Decoder, Encoder, latent_grid
from twostage.tokenizers.vq.config import VQConfig
from twostage.tokenizers.vq.quantizer import QuantizerOutput, VectorQuantizer


class VQOutput(NamedTuple):
    recon: torch.Tensor  # (N, C, H, W)
    latent: torch.Tensor  # (N, D, h, w) raw pre-quantization latent (after quant_conv, before l2)
    quant: QuantizerOutput


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            l2_norm=cfg.l2_norm,
            commit_weight=cfg.commit_weight,
            codebook_weight=cfg.codebook_weight,
            entropy_weight=cfg.entropy_weight,
            entropy_temperature=cfg.entropy_temperature,
        )
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        # The training task sets this when it lays the model out NHWC (twostage/tokenizers/vq/task.py): the
        # codes then enter the decoder NHWC too. A flag rather than a query of the input's layout, which
        # torch.func.vmap cannot answer (K seeds as one stacked model: twostage/tokenizers/run.py train_replicas).
        self.channels_last_codes = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        return latent_grid(image_size, self.downsample_factor)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pre-quantization latent (N, D, h, w)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.encode_latent(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q.to(self.post_quant_conv.weight.dtype)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantizer.indices_to_latent(indices))

    def forward(self, x: torch.Tensor) -> VQOutput:
        latent = self.encode_latent(x)
        quant = self.quantizer(latent)
        z_q = quant.z_q
        if self.channels_last_codes:
            z_q = z_q.contiguous(memory_format=torch.channels_last)
        return VQOutput(self.decode(z_q), latent, quant)
