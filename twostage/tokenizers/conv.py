"""The convolutional encoder / decoder trunk shared by the VQ and KL tokenizers (LlamaGen VQ-16 / LDM).

Encoder: conv_in -> levels (channel multipliers; ResBlocks; downsample between levels) -> mid
(Res-Attn-Res) -> GroupNorm/SiLU/conv_out. The number of levels sets the downsampling factor
f = 2 ** (levels - 1): (1,1,2,2,4) is f16, (1,2,2,4) f8, (1,2,4) f4, (1,2) f2. Self-attention runs
only at the lowest resolution, where the token count is smallest. The decoder mirrors the encoder
with more ResBlocks per level and nearest-neighbour upsampling.

Performance notes: all attention goes through F.scaled_dot_product_attention (flash / memory-efficient
kernels on CUDA); everything is convolutional otherwise, so channels_last inputs keep the network in
NHWC end to end; nothing in forward synchronizes with the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn



class GroupNorm(nn.GroupNorm):
    """GroupNorm that stays in the activation dtype under autocast.

    Autocast runs group_norm in fp32: every activation is upcast (a full copy), normalized, and the
    fp32 output is cast back by the next conv (another copy), which made GroupNorm the largest cost of
    an eager bf16 step. The CUDA kernel accumulates its statistics in fp32 whatever the input dtype,
    so running it on the bf16 activations directly loses nothing that matters and halves the bytes.
    Under torch.compile the plain path is kept: Inductor fuses the casts into its own norm kernels
    (measured faster there: 147 vs 135 images/s, VQ-16 batch 32 on an H100).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling()):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # Tiny test models may have fewer channels than the recipe's 32 groups.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return GroupNorm(g, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-scale spatial self-attention over the h*w positions (fused qkv, SDPA)."""

    def __init__(self, channels: int, heads: int = 1, groups: int = 32) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # (N, 3C, h, w) -> 3 x (N, heads, hw, C/heads); reshape works for NCHW and NHWC storage alike.
        qkv = qkv.reshape(n, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out = out.permute(0, 1, 3, 2).reshape(n, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric pad so a stride-2 3x3 conv halves even sizes exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResBlocks (+ attention after each at the lowest resolution) and an optional resampler."""

    def __init__(self, cin: int, cout: int, blocks: int, attn: bool, resample: nn.Module | None, cfg) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()
        for i in range(blocks):
            self.blocks.append(ResBlock(cin if i == 0 else cout, cout, cfg.norm_groups, cfg.dropout))
            if attn:
                self.attns.append(AttnBlock(cout, cfg.attn_heads, cfg.norm_groups))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attns):
                x = self.attns[i](x)
        return self.resample(x)


class Mid(nn.Module):
    def __init__(self, channels: int, cfg) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, cfg.norm_groups, cfg.dropout)
        self.attn = AttnBlock(channels, cfg.attn_heads, cfg.norm_groups) if cfg.mid_attn else nn.Identity()
        self.res2 = ResBlock(channels, channels, cfg.norm_groups, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: Any) -> None:  # VQConfig or the KL trunk namespace
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            cout = ch * m
            down = None if last else Downsample(cout)
            self.levels.append(Level(cin, cout, cfg.enc_res_blocks, attn=last, resample=down, cfg=cfg))
            cin = cout
        self.mid = Mid(cin, cfg)
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: Any) -> None:  # VQConfig or the KL trunk namespace
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(cin, cfg)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(mult))):
            cout = ch * mult[i]
            up = Upsample(cout) if i > 0 else None
            self.levels.append(
                Level(cin, cout, cfg.dec_res_blocks, attn=i == len(mult) - 1, resample=up, cfg=cfg)
            )
            cin = cout
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the GAN's adaptive weight takes gradient norms at."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def latent_grid(image_size: int | tuple[int, int], factor: int) -> tuple[int, int]:
    """The (h, w) latent grid of an image size at downsampling factor `factor`."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}")
    return h // factor, w // factor
