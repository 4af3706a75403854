"""LightningDiT (arXiv 2501.01423): a class-conditional diffusion transformer that predicts flow velocities.

    model = DIT_MODELS["B"](in_channels=32, grid=(16, 16), num_classes=1000, patch_size=1)
    v = model(x_t, t, labels)          # x_t (N, C, H, W), t (N,) in [0, 1] (1 = data), labels (N,)
    v, h = model(x_t, t, labels, hidden_at=4)   # also the tokens (N, T, width) after block 4 (1-based; REPA)

Architecture: patchify (a linear map of p x p patches) + fixed 2D sin-cos positions -> blocks ->
AdaLN-modulated final norm -> linear -> unpatchify. Each block is pre-norm with RMSNorm, modulated by
AdaLN-Zero (shift / scale / gate from the conditioning c = emb(t) + emb(label), gates and the output
layer zero-initialized so every block starts as the identity and the network predicts v = 0), fused-qkv
attention through scaled_dot_product_attention with 2D RoPE (twostage/nn/rope.py, over the patch grid)
and optional QK-norm, and a SwiGLU feed-forward (hidden 2/3 of 4 x width; twostage/nn/layers.py). The
label table has num_classes + 1 rows; the last is the null class of classifier-free guidance (label
dropout happens in the training task).

The block norms carry no affine weight: the AdaLN (1 + scale) already is a per-sample channel gain, so a
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
from twostage.nn.layers import RMSNorm, SwiGLU, rms_norm
from twostage.nn.rope import apply_rope, rope_2d_tables

TIME_SCALE = 1000.0  # t in [0, 1] -> [0, 1000] before the sinusoids, so their frequencies span t's range


# -- positions ------------------------------------------------------------------------------------------


def sincos_2d(grid: tuple[int, int], width: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (h*w, width) float32: half the channels for rows, half for columns."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    h, w = grid
    idx = torch.arange(h * w)
    rows, cols = (idx // w).double()[:, None] * omega, (idx % w).double()[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=-1).float()


# -- layers ---------------------------------------------------------------------------------------------


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


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, qk_norm: bool, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Attention(width, heads, qk_norm, eps)
        self.mlp = SwiGLU(width, hidden, bias=True)
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
        self.ffn_hidden = ffn_hidden(width, cfg.mlp_ratio)
        self.patch_embed = nn.Linear(in_channels * p * p, width)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # last row: null class
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, self.ffn_hidden, cfg.qk_norm, cfg.norm_eps) for _ in range(layers)
        )
        self.final_ada = nn.Linear(width, 2 * width)
        self.final = nn.Linear(width, in_channels * p * p)
        if cfg.abs_pos:
            self.register_buffer("pos", sincos_2d(self.tokens_grid, width), persistent=False)
        else:
            self.pos = None
        if cfg.rope:
            # (T, 1, 1, D): broadcast over the stacked q / k and the heads of the token-major (b, t, 2, heads, D)
            cos, sin = rope_2d_tables(self.tokens_grid, width // heads, prefix=0, base=cfg.rope_base)
            self.register_buffer("rope_cos", cos[:, None, None], persistent=False)
            self.register_buffer("rope_sin", sin[:, None, None], persistent=False)
        # The dimension-dependent time shift (flow.dimension_shift) the network trains with; not a weight:
        # set by task.build_model from the run config, read by task.generate_latents for the sampling grid.
        self.time_shift: float = 1.0
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, hidden_at: int | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity (N, C, H, W) at x_t; t (N,) in [0, 1] with 1 = data (see flow.py).

        hidden_at k (1-based): also return the tokens (N, T, width) after block k, T in patch-grid
        row-major order (REPA aligns them, repa.py).
        """
        if x.shape[1:] != (self.in_channels, *self.grid):
            raise ValueError(f"expected latents (N, {self.in_channels}, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(x.shape)}")
        h = self.patch_embed(self.patchify(x))
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)
        c = F.silu(self.t_embed(t) + self.y_embed(labels))
        rope = (self.rope_cos, self.rope_sin) if self.cfg.rope else None
        hidden = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c, rope)
            if i == hidden_at:
                hidden = h
        shift, scale = self.final_ada(c).unsqueeze(1).chunk(2, dim=-1)
        v = self.unpatchify(self.final(modulate(rms_norm(h, self.eps), shift, scale)))
        if hidden_at is None:
            return v
        if hidden is None:
            raise ValueError(f"hidden_at={hidden_at}: the model has blocks 1..{len(self.blocks)}")
        return v, hidden

    # -- accounting -----------------------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        """Parameters in total and without the label table (the one lookup; every other weight acts
        per token or per sample in every forward)."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.y_embed.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def flops_per_token(self) -> dict[str, float]:
        """Forward and training (3 x forward) FLOPs per *latent position* (h*w per image, the
        tokenizer's grid), whatever the patch size: C = flops * steps * batch * h*w holds for any p."""
        layers, width, _ = self.cfg.shape
        per_image = forward_flops_per_image(layers, width, self.ffn_hidden, self.in_channels, self.patch,
                                            self.grid, self.t_embed.freq_dim)
        forward = per_image / (self.grid[0] * self.grid[1])
        return {"train": 3.0 * forward, "forward": forward, "train_per_image": 3.0 * per_image}

    def architecture(self) -> dict:
        """The DiT kind's own keys of model.json (twostage/generators/runs.py has the shared ones)."""
        layers, width, heads = self.cfg.shape
        return {"size": self.cfg.size, "layers": layers, "width": width, "heads": heads,
                "ffn_hidden": self.ffn_hidden, "patch_size": self.patch, "patch_grid": list(self.tokens_grid),
                "channels": self.in_channels}


def forward_flops_per_image(layers: int, width: int, ffn_hidden: int, in_channels: int, patch_size: int,
                            grid: tuple[int, int], time_freq_dim: int = 256) -> float:
    """Matmul FLOPs of one image's forward pass (one network evaluation; twostage/study/flops.py's convention).

    With T = (h/p)(w/p) tokens of P = in_channels * p^2 inputs each:
        per token:  4 P w (patch embedding + output layer) + L * (8 w^2 + 6 w h + 4 T w)
        per image:  2 * time_freq_dim * w + 2 w^2 (timestep MLP) + 12 L w^2 (AdaLN of each block)
                    + 4 w^2 (final AdaLN)
    The per-image terms act once on the conditioning vector, not per token (so the 6 N D rule, which
    counts them per token, overstates a DiT's compute).
    """
    w, h, p = width, ffn_hidden, patch_size
    tokens = (grid[0] // p) * (grid[1] // p)
    inputs = in_channels * p * p
    per_token = 4 * inputs * w + layers * (8 * w * w + 6 * w * h + 4 * tokens * w)
    per_image = 2 * time_freq_dim * w + 2 * w * w + 12 * layers * w * w + 4 * w * w
    return float(tokens * per_token + per_image)


def build_dit(size: str = "B", *, in_channels: int, grid: tuple[int, int], num_classes: int,
              **overrides) -> LightningDiT:
    """A LightningDiT of a named size; `overrides` are DiTModelConfig fields (patch_size=2, qk_norm=True...)."""
    return LightningDiT(DiTModelConfig(size=size, **overrides), in_channels, grid, num_classes)


# Named sizes as factories: DIT_MODELS["XL"](in_channels=32, grid=(16, 16), num_classes=1000, patch_size=1).
DIT_MODELS = {name: functools.partial(build_dit, name) for name in DIT_SHAPES}


__all__ = ["LightningDiT", "DIT_MODELS", "build_dit", "sincos_2d", "ffn_hidden", "forward_flops_per_image",
           "TIME_SCALE"]
