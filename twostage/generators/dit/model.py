"""LightningDiT: a class-conditional diffusion transformer that predicts flow velocities (METHODS 7).

    model = DIT_MODELS["B"](in_channels=32, grid=(16, 16), num_classes=1000, patch_size=1)
    v = model(x_t, t, labels)          # x_t (N, C, H, W), t (N,) in [0, 1] (1 = data), labels (N,)

Architecture: patchify (a linear map of p x p patches) + fixed 2D sin-cos positions -> blocks ->
AdaLN-modulated final norm -> linear -> unpatchify. Each block is pre-norm with RMSNorm, modulated by
AdaLN-Zero (shift / scale / gate from the conditioning c = emb(t) + emb(label), gates and the output
layer zero-initialized so every block starts as the identity and the network predicts v = 0), fused-qkv
attention through scaled_dot_product_attention with 2D RoPE and optional QK-norm, and a SwiGLU
feed-forward (hidden 2/3 of 4 x width). The label table has num_classes + 1 rows; the last is the null
class of classifier-free guidance (label dropout happens in the training task).

The norms carry no affine weight: the AdaLN (1 + scale) already is a per-sample channel gain, so a
learned one would be redundant. Norms and RoPE compute in float32 and return the input dtype, so the
model is bf16-autocast friendly; nothing synchronizes with the host, so it compiles to one graph.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from twostage.generators.dit.config import DIT_SHAPES, DiTModelConfig

TIME_SCALE = 1000.0  # t in [0, 1] -> [0, 1000] before the sinusoids, so their frequencies span t's range


# -- positions ------------------------------------------------------------------------------------------


def rope_2d(grid: tuple[int, int], head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (h*w, head_dim) float32 for 2D RoPE over a raster-ordered grid.

    Dim j pairs with dim j + D/2 ("rotate half" layout: the rotation is one concat, cheap and
    coalesced). Of the D/2 pairs, the first D/4 turn by row * base ** (-k / F), the other D/4 by
    column * base ** (-k / F), k < F = D/4: half of each head encodes rows, half columns.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    f = head_dim // 4
    freqs = base ** (-torch.arange(f, dtype=torch.float64) / f)
    h, w = grid
    idx = torch.arange(h * w)
    rows, cols = (idx // w).double()[:, None] * freqs, (idx % w).double()[:, None] * freqs
    angles = torch.cat([rows, cols, rows, cols], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """[a, b] (halves of the last dim) -> [-b, a]."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, T, ..., D) rotated by (T, D) tables, in float32, returned in x's dtype.

    Applied in the token-major layout that the qkv projection produces (before any transpose for
    attention), so reads and writes stay contiguous in forward and backward.
    """
    shape = (cos.shape[0],) + (1,) * (x.ndim - 3) + (cos.shape[1],)
    xf = x.float()
    return (xf * cos.view(shape) + _rotate(xf) * sin.view(shape)).to(x.dtype)


def sincos_2d(grid: tuple[int, int], width: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (h*w, width) float32: half the channels for rows, half for columns."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    h, w = grid
    idx = torch.arange(h * w)
    rows, cols = (idx // w).double()[:, None] * omega, (idx % w).double()[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=-1).float()


# -- layers ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    # float32 statistics: the bf16 mean of squares is too coarse for the residual stream.
    out = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return out if weight is None else out * weight.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, width = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim)
        # Norm and rotate in the (b, t, heads, d) layout, q and k together when possible: one
        # contiguous elementwise pass (a (b, heads, t, d) permute first made RoPE's backward ~5x slower).
        if self.q_norm is not None:
            qk = torch.stack((self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1])), dim=2)
        else:
            qk = qkv[:, :, :2]
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, t, head_dim): flash attention on GPUs
        return self.proj(out.transpose(1, 2).reshape(b, t, width))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden)  # both input projections in one matmul
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, qk_norm: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Attention(width, heads, qk_norm, eps)
        self.mlp = SwiGLU(width, hidden)
        self.ada = nn.Linear(width, 6 * width)  # AdaLN-Zero: shift/scale/gate for attention and MLP

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(rms_norm(x, self.eps), shift_a, scale_a), rope)
        return x + gate_m * self.mlp(modulate(rms_norm(x, self.eps), shift_m, scale_m))


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * TIME_SCALE)[:, None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


# -- the model ------------------------------------------------------------------------------------------


def ffn_hidden(width: int, mlp_ratio: float) -> int:
    return (int(mlp_ratio * width * 2 / 3) + 7) // 8 * 8


class LightningDiT(nn.Module):
    def __init__(self, cfg: DiTModelConfig, in_channels: int, grid: tuple[int, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        layers, width, heads = cfg.shape
        p = cfg.patch_size
        h, w = grid
        if h % p or w % p:
            raise ValueError(f"the latent grid {h}x{w} is not divisible by model.patch_size={p}")
        self.in_channels, self.grid, self.num_classes, self.patch = in_channels, (h, w), num_classes, p
        self.tokens_grid = (h // p, w // p)
        self.width, self.eps = width, cfg.norm_eps
        self.patch_embed = nn.Linear(in_channels * p * p, width)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # last row: null class
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, ffn_hidden(width, cfg.mlp_ratio), cfg.qk_norm, cfg.norm_eps) for _ in range(layers)
        )
        self.final_ada = nn.Linear(width, 2 * width)
        self.final = nn.Linear(width, in_channels * p * p)
        if cfg.abs_pos:
            self.register_buffer("pos", sincos_2d(self.tokens_grid, width), persistent=False)
        else:
            self.pos = None
        if cfg.rope:
            cos, sin = rope_2d(self.tokens_grid, width // heads, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def null_label(self) -> int:
        return self.num_classes

    def reset_parameters(self) -> None:
        """DiT's initialization: xavier linears, N(0, 0.02) embeddings, zero AdaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape[0], self.patch, self.in_channels
        gh, gw = self.tokens_grid
        x = x.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity (N, C, H, W) at x_t; t (N,) in [0, 1] with 1 = data (see flow.py)."""
        if x.shape[1:] != (self.in_channels, *self.grid):
            raise ValueError(f"expected latents (N, {self.in_channels}, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(x.shape)}")
        h = self.patch_embed(self.patchify(x))
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)
        c = F.silu(self.t_embed(t) + self.y_embed(labels))
        rope = (self.rope_cos, self.rope_sin) if self.cfg.rope else None
        for block in self.blocks:
            h = block(h, c, rope)
        shift, scale = self.final_ada(c).unsqueeze(1).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(rms_norm(h, self.eps), shift, scale)))


def build_dit(size: str = "B", *, in_channels: int, grid: tuple[int, int], num_classes: int,
              **overrides) -> LightningDiT:
    """A LightningDiT of a named size; `overrides` are DiTModelConfig fields (patch_size=2, qk_norm=True...)."""
    return LightningDiT(DiTModelConfig(size=size, **overrides), in_channels, grid, num_classes)


# Named sizes as factories: DIT_MODELS["XL"](in_channels=32, grid=(16, 16), num_classes=1000, patch_size=1).
DIT_MODELS = {name: functools.partial(build_dit, name) for name in DIT_SHAPES}


def non_embedding_parameters(model: LightningDiT) -> int:
    """Parameters that act per token or per sample in every forward (all but the label table)."""
    return sum(p.numel() for p in model.parameters()) - model.y_embed.weight.numel()


__all__ = ["LightningDiT", "DIT_MODELS", "build_dit", "rope_2d", "apply_rope", "sincos_2d", "ffn_hidden",
           "non_embedding_parameters", "TIME_SCALE"]
