"""CRT: causally regularized tokenization ("When Worse is Better", arXiv:2412.16326; docs/methods.md §3).

A small causal transformer g reads the tokenizer's pre-quantization latents in raster order and
regresses the next latent:

    L_CRT = mean_i || g(start, z_1..z_i) - z_{i+1} ||^2        (i = 0 is the learned start token)

The loss is back-propagated into the encoder, which therefore learns latents that are predictable from
their predecessors (lower conditional entropy for the stage-2 AR model). g is discarded after stage 1.

Open choices (config options, defaults as documented): loss on l2-normalized latents (default; on raw
latents the loss can be gamed by shrinking the norm, which the normalized lookup ignores), stop-gradient
on the target side (default off), width (256), positions (learned absolute, or 2D RoPE), class conditioning (off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twostage.nn.rope import apply_rope, rope_2d_tables


def crt_weight(step: int, weight: float, ramp_steps: int) -> float:
    """Loss weight at `step`: linear ramp from 0 to `weight` over the first `ramp_steps` steps."""
    if ramp_steps <= 0:
        return weight
    return weight * min(1.0, step / ramp_steps)


class CausalBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, n, c)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class CausalPredictor(nn.Module):
    """g: (N, D, h, w) latents -> (N, h*w, D) predictions of z_1..z_L from (start, z_1..z_{L-1})."""

    def __init__(
        self,
        code_dim: int,
        grid: tuple[int, int],
        *,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        positions: str = "learned",
        dropout: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"crt.width={width} is not divisible by crt.heads={heads}")
        if positions not in ("learned", "rope2d"):
            raise ValueError(f"crt.positions={positions!r}: choose 'learned' or 'rope2d'")
        self.grid = tuple(grid)
        self.positions = positions
        self.head_dim = width // heads
        num_tokens = grid[0] * grid[1]
        self.inp = nn.Linear(code_dim, width)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        # Optional class conditioning (open in the paper; default off): a per-class offset of the start token.
        self.class_emb = nn.Embedding(num_classes, width) if num_classes > 0 else None
        if positions == "learned":
            self.pos = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        else:
            # The shared 2D RoPE (twostage/nn/rope.py): input position 0 is the start token (a prefix,
            # unrotated); position i >= 1 holds z_i at raster index i-1, rotated by its (row, col).
            cos, sin = rope_2d_tables(self.grid, self.head_dim, prefix=1)
            # Not persistent: derived from the grid, so checkpoints stay independent of it.
            self.register_buffer("rope_cos", cos[:num_tokens], persistent=False)
            self.register_buffer("rope_sin", sin[:num_tokens], persistent=False)
        self.blocks = nn.ModuleList(CausalBlock(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, code_dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, d, h, w = latents.shape
        if (h, w) != self.grid:
            raise ValueError(f"CRT predictor was built for a {self.grid} latent grid, got {(h, w)}")
        seq = latents.flatten(2).transpose(1, 2)  # raster order (N, L, D)
        x = self.inp(seq[:, :-1])
        start = self.start.expand(n, 1, -1)
        if self.class_emb is not None:
            if labels is None:
                raise ValueError("this CRT predictor is class-conditional: pass labels")
            start = start + self.class_emb(labels.long()).unsqueeze(1)
        x = torch.cat([start.to(x.dtype), x], dim=1)
        rope = None
        if self.positions == "learned":
            x = x + self.pos.to(x.dtype)
        else:
            rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            x = block(x, rope)
        return self.out(self.norm(x))


def crt_loss(
    predictor: nn.Module,
    latent: torch.Tensor,
    *,
    normalize: bool = True,
    stop_grad_target: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-latent l2 regression loss on the (N, D, h, w) pre-quantization latent.

    Squared l2 distance summed over the D channels, averaged over positions and images, as in
    docs/methods.md (3.1). Gradients flow into `latent` through both the predictor input and (unless
    stop_grad_target) the target.
    """
    z = F.normalize(latent.float(), dim=1) if normalize else latent.float()
    target = z.flatten(2).transpose(1, 2)
    if stop_grad_target:
        target = target.detach()
    pred = predictor(z, labels) if labels is not None else predictor(z)
    return (pred.float() - target).pow(2).sum(-1).mean()


def predictor_flops(num_tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of g per image (matmuls + attention), for the ~5% overhead bookkeeping."""
    per_layer = 2 * num_tokens * (4 * width * width + 2 * mlp_ratio * width * width)
    per_layer += 2 * 2 * num_tokens * num_tokens * width / 2  # causal: half the score/value matmuls
    return float(layers * per_layer)


__all__ = ["CausalPredictor", "crt_loss", "crt_weight", "predictor_flops"]
