"""RAE's trained ViT decoder: latent tokens in, p x p pixel patches out (docs/methods.md §7, (7.11)).

    dec = ViTDecoder(in_channels=768, out_channels=3, patch=16, grid=(16, 16), cfg=cfg.model.decoder)
    x = dec(z)          # z (N, 768, 16, 16) -> x (N, 3, 256, 256), unbounded (clamped at inference)

RAE decodes with an MAE-style ViT (arXiv:2111.06377): each latent position is one token, linearly embedded
to the decoder width, plus fixed 2D sin-cos positions; pre-norm transformer blocks with full
(bidirectional) attention; a final norm and one linear layer to the p x p x C pixels of its patch. The
layers are the package's own (no second copy): the LightningDiT's attention and sin-cos table
(twostage/generators/dit/model.py) and the RMSNorm / SwiGLU of twostage/nn/layers.py, so this is the
MAE decoder with Llama-style norms and feed-forward rather than LayerNorm / GELU. Init as MAE: Xavier
linears, zero biases.
"""

from __future__ import annotations

import torch
from torch import nn

from twostage.generators.dit.model import Attention, ffn_hidden, sincos_2d
from twostage.nn.layers import RMSNorm, SwiGLU
from twostage.tokenizers.rae.config import RAEDecoderConfig


class DecoderBlock(nn.Module):
    """x += Attn(RMS(x)); x += SwiGLU(RMS(x))."""

    def __init__(self, width: int, heads: int, hidden: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(width, eps)
        self.attn = Attention(width, heads, qk_norm, eps)
        self.mlp_norm = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), None)  # no RoPE: positions are the additive sin-cos table
        return x + self.mlp(self.mlp_norm(x))


class ViTDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, patch: int, grid: tuple[int, int],
                 cfg: RAEDecoderConfig) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.patch, self.grid = in_channels, out_channels, patch, tuple(grid)
        width = cfg.width
        self.embed = nn.Linear(in_channels, width)
        # The training grid's table; other grids (decoding latents of another size) build theirs on the fly.
        self.register_buffer("pos", sincos_2d(self.grid, width), persistent=False)
        hidden = ffn_hidden(width, cfg.mlp_ratio)
        self.blocks = nn.ModuleList(DecoderBlock(width, cfg.heads, hidden, cfg.qk_norm, cfg.norm_eps)
                                    for _ in range(cfg.depth))
        self.norm = RMSNorm(width, cfg.norm_eps)
        self.head = nn.Linear(width, patch * patch * out_channels)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight takes gradient norms at (the pixel head)."""
        return self.head.weight

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos
        return sincos_2d(tuple(grid), self.pos.shape[-1]).to(self.pos.device)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p): token (i, j) paints pixels [i*p, (i+1)*p) x [j*p, (j+1)*p)."""
        n, (h, w), p, c = x.shape[0], grid, self.patch, self.out_channels
        return x.view(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h * p, w * p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f"latents must be (N, {self.in_channels}, h, w), got {tuple(z.shape)}")
        grid = (z.shape[-2], z.shape[-1])
        x = self.embed(z.flatten(2).transpose(1, 2).to(self.embed.weight.dtype))  # (N, h*w, width)
        x = x + self.positions(grid).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.unpatchify(self.head(self.norm(x)), grid)


__all__ = ["ViTDecoder", "DecoderBlock"]
