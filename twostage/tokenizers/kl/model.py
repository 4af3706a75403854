"""KL-regularized autoencoder (LDM KL-VAE; VA-VAE's tokenizer), LDM arXiv:2112.10752, VA-VAE arXiv:2501.01423; docs/methods.md §6, (6.1).

    model = KLModel(cfg.model)        # spec "f16d32": 256 px -> 16 x 16 x 32 latents
    out = model(x)                    # out.recon, out.posterior, out.latent (the sampled z)
    z = model.encode(x).mode()        # deterministic latents for caches

The convolutional trunk is the VQ tokenizer's Encoder / Decoder (twostage/tokenizers/conv.py). The
encoder ends in 2 * z channels (mean and log-variance of a diagonal Gaussian), refined by a 1x1
quant_conv into 2 * d as in LDM; the decoder starts from a 1x1 post_quant_conv of the d-channel sample
(z = d unless model.z_channels says otherwise). The options published autoencoders need
(model.attn_levels, z_channels, quant_conv, post_quant_conv; twostage/tokenizers/kl/config.py) are applied
here, on top of the shared trunk, whose VQ layout stays fixed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn

from twostage.tokenizers.kl.config import KLModelConfig
from twostage.tokenizers.conv import AttnBlock, Decoder, Encoder, latent_grid


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))) from (N, 2d, h, w) moments."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.float().chunk(2, dim=1)
        # LDM's clamp: keeps exp() finite early in training, when the encoder output is arbitrary.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (d, h, w): one value per image (N,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class KLOutput(NamedTuple):
    recon: torch.Tensor  # (N, C, H, W)
    posterior: DiagonalGaussian
    latent: torch.Tensor  # (N, d, h, w): the sample the decoder saw (the mean when sample=False)


def trunk_config(cfg: KLModelConfig, z_channels: int) -> SimpleNamespace:
    """The attributes Encoder / Decoder read, with the level list resolved from the spec."""
    return SimpleNamespace(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, base_channels=cfg.base_channels,
        channel_mult=cfg.levels, enc_res_blocks=cfg.enc_res_blocks, dec_res_blocks=cfg.dec_res_blocks,
        z_channels=z_channels, norm_groups=cfg.norm_groups, attn_heads=cfg.attn_heads, mid_attn=cfg.mid_attn,
        dropout=cfg.dropout,
    )


def place_attention(trunk: Encoder | Decoder, levels: tuple[int, ...], cfg: KLModelConfig) -> None:
    """Attention after every ResBlock of exactly the levels `levels` (indices into cfg.levels, 0 = full
    resolution). The shared trunk puts it at the lowest resolution only; LDM's attn_resolutions can name
    none (SD's f8 VAE) or several levels (kl-f32), in the encoder and decoder alike."""
    count = len(trunk.levels)
    for k, level in enumerate(trunk.levels):
        index = count - 1 - k if isinstance(trunk, Decoder) else k  # the decoder runs lowest resolution first
        if (index in levels) == bool(len(level.attns)):
            continue
        level.attns = nn.ModuleList(
            [AttnBlock(block.conv2.out_channels, cfg.attn_heads, cfg.norm_groups) for block in level.blocks]
            if index in levels else [])


class KLModel(nn.Module):
    def __init__(self, cfg: KLModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, z = cfg.latent_channels, cfg.trunk_channels
        self.latent_channels = d
        self.encoder = Encoder(trunk_config(cfg, 2 * z))
        self.quant_conv = nn.Conv2d(2 * z, 2 * d, 1) if cfg.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(d, z, 1) if cfg.post_quant_conv else nn.Identity()
        self.decoder = Decoder(trunk_config(cfg, z))
        if cfg.attn_levels is not None:  # None keeps the trunk's own layout (and its parameter order) as it is
            place_attention(self.encoder, cfg.attention_levels, cfg)
            place_attention(self.decoder, cfg.attention_levels, cfg)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.levels) - 1)

    @property
    def encoder_last_layer(self) -> torch.Tensor:
        """Weight the VF loss's adaptive weight takes gradient norms at (VA-VAE: the encoder's conv_out)."""
        return self.encoder.conv_out.weight

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight the GAN's adaptive weight takes gradient norms at."""
        return self.decoder.last_layer

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        return latent_grid(image_size, self.downsample_factor)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.decoder.conv_in.weight.dtype)))

    def forward(self, x: torch.Tensor, sample: bool = True) -> KLOutput:
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        if x.is_contiguous(memory_format=torch.channels_last):
            z = z.contiguous(memory_format=torch.channels_last)
        return KLOutput(self.decode(z), posterior, z)


__all__ = ["DiagonalGaussian", "KLOutput", "KLModel", "trunk_config", "place_attention"]
