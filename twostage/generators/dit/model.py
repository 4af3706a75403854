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
learned one would be redundant (a converted checkpoint's gains are folded into the AdaLN scale,
twostage/convert/lightningdit.py). Norms and RoPE compute in float32 and return the input dtype, so the
model is bf16-autocast friendly; nothing synchronizes with the host, so it compiles to one graph.

With `model.ddt.enabled` (docs/methods.md §7, (7.9)) the trunk's output layer is replaced by a DDT head
(`DDTHead`, arXiv 2504.05741): blocks of their own width on a fresh patch embedding of x_t, modulated per
token by the trunk's output tokens plus the time embedding. Off, the module (its parameters, their
names and their initialization) is what it was before the option existed.
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


POS_ORDERS = ("row_col", "col_row")


def sincos_2d(grid: tuple[int, int], width: int, order: str = "row_col") -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (h*w, width) float32: half the channels for rows, half for columns.

    order "row_col": [sin row, cos row, sin col, cos col]; "col_row": the column half first (what DiT's and
    LightningDiT's table holds: its "emb_h" half is computed from the meshgrid's first, i.e. column, axis).
    """
    if order not in POS_ORDERS:
        raise ValueError(f"order must be one of {POS_ORDERS}, got {order!r}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    h, w = grid
    idx = torch.arange(h * w)
    rows, cols = (idx // w).double()[:, None] * omega, (idx % w).double()[:, None] * omega
    halves = [torch.cat([rows.sin(), rows.cos()], -1), torch.cat([cols.sin(), cols.cos()], -1)]
    return torch.cat(halves if order == "row_col" else halves[::-1], dim=-1).float()


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
        """c: (N, width) one conditioning vector per sample (the trunk), or (N, T, width) one per token
        (the DDT head)."""
        mod = self.ada(c)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod if c.ndim == 3 else mod.unsqueeze(1)).chunk(6, -1)
        x = x + gate_a * self.attn(modulate(rms_norm(x, self.eps), shift_a, scale_a), rope)
        return x + gate_m * self.mlp(modulate(rms_norm(x, self.eps), shift_m, scale_m))


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256, time_scale: float = TIME_SCALE):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.time_scale)[:, None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


# -- the model ------------------------------------------------------------------------------------------


def ffn_hidden(width: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """SwiGLU hidden size: 2/3 of the mlp_ratio x width MLP, rounded up to a multiple of `multiple_of`."""
    return -(-int(mlp_ratio * width * 2 / 3) // multiple_of) * multiple_of


def rope_buffers(module: nn.Module, grid: tuple[int, int], head_dim: int, base: float) -> None:
    """Register the 2D RoPE tables of `grid` as (T, 1, 1, D) buffers rope_cos / rope_sin: they broadcast over
    the stacked q / k and the heads of the token-major (b, t, 2, heads, D) layout."""
    cos, sin = rope_2d_tables(grid, head_dim, prefix=0, base=base)
    module.register_buffer("rope_cos", cos[:, None, None], persistent=False)
    module.register_buffer("rope_sin", sin[:, None, None], persistent=False)


class DDTHead(nn.Module):
    """The DDT head (arXiv 2504.05741; as in RAE's DiT-DH): a wide, shallow decoder after the trunk.

    Its tokens are a fresh patch embedding of x_t (`embed`), not the trunk's hidden states; each of its
    blocks and its output layer are AdaLN-modulated *per token* by
        s_i = SiLU(P(SiLU(emb_t(t) + h_i)))                                 (docs/methods.md (7.9))
    with h_i the trunk's output token at position i (no final norm, as RAE) and P a linear map from the
    trunk width to the head width (the identity when they are equal, as RAE). The class label reaches the
    head only through h. Positions: 2D RoPE on the head's own head width (no absolute table, as RAE).
    Init as the trunk: xavier linears, zero AdaLN and output layers, so the head starts at v = 0.
    """

    shard_units = ("blocks",)  # FSDP units: each block (twostage/engine/fsdp.py)

    def __init__(self, cfg: DiTModelConfig, trunk_width: int, inputs: int, grid: tuple[int, int]):
        super().__init__()
        d = cfg.ddt
        self.width, self.depth, self.heads = d.width, d.depth, d.heads
        self.ffn_hidden = ffn_hidden(d.width, cfg.mlp_ratio, cfg.ffn_multiple_of)
        self.eps, self.use_rope = cfg.norm_eps, cfg.rope
        self.embed = nn.Linear(inputs, d.width)
        self.cond = nn.Linear(trunk_width, d.width) if d.width != trunk_width else nn.Identity()
        self.blocks = nn.ModuleList(
            DiTBlock(d.width, d.heads, self.ffn_hidden, cfg.qk_norm, cfg.norm_eps) for _ in range(d.depth)
        )
        self.final_ada = nn.Linear(d.width, 2 * d.width)
        self.final = nn.Linear(d.width, inputs)
        if cfg.rope:
            rope_buffers(self, grid, d.width // d.heads, cfg.rope_base)

    def conditioning(self, trunk: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """(N, T, head width) per-token conditioning from the trunk's tokens (N, T, w) and emb_t(t) (N, w)."""
        return F.silu(self.cond(F.silu(trunk + t_emb.unsqueeze(1))))

    def forward(self, patches: torch.Tensor, trunk: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """patches (N, T, C p^2) of x_t -> (N, T, C p^2) output patches."""
        s = self.conditioning(trunk, t_emb)
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        x = self.embed(patches)
        for block in self.blocks:
            x = block(x, s, rope)
        shift, scale = self.final_ada(s).chunk(2, dim=-1)
        return self.final(modulate(rms_norm(x, self.eps), shift, scale))

    def zero_init(self) -> None:
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


class LightningDiT(nn.Module):
    shard_units = ("blocks",)  # FSDP units: each block (twostage/engine/fsdp.py)

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
        self.ffn_hidden = ffn_hidden(width, cfg.mlp_ratio, cfg.ffn_multiple_of)
        self.patch_embed = nn.Linear(in_channels * p * p, width)
        self.t_embed = TimestepEmbedder(width, time_scale=cfg.time_scale)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # last row: null class
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, self.ffn_hidden, cfg.qk_norm, cfg.norm_eps) for _ in range(layers)
        )
        # The output layer: the trunk's own, or the DDT head's (then the trunk has none: unused
        # parameters would get no gradient and count in the parameter total).
        self.ddt: DDTHead | None = None
        if cfg.ddt.enabled:
            self.ddt = DDTHead(cfg, width, in_channels * p * p, self.tokens_grid)
        else:
            self.final_ada = nn.Linear(width, 2 * width)
            self.final = nn.Linear(width, in_channels * p * p)
        if cfg.abs_pos:
            self.register_buffer("pos", sincos_2d(self.tokens_grid, width, cfg.pos_order), persistent=False)
        else:
            self.pos = None
        if cfg.rope:
            rope_buffers(self, self.tokens_grid, width // heads, cfg.rope_base)
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
        if self.ddt is not None:
            self.ddt.zero_init()
            zeroed = [b.ada for b in self.blocks]
        else:
            zeroed = [b.ada for b in self.blocks] + [self.final_ada, self.final]
        for m in zeroed:
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

        hidden_at k (1-based): also return the tokens (N, T, width) after block k of the trunk, T in
        patch-grid row-major order (REPA aligns them, repa.py).
        """
        if x.shape[1:] != (self.in_channels, *self.grid):
            raise ValueError(f"expected latents (N, {self.in_channels}, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(x.shape)}")
        patches = self.patchify(x)
        h = self.patch_embed(patches)
        if self.pos is not None:
            h = h + self.pos.to(h.dtype)
        t_emb = self.t_embed(t)
        c = F.silu(t_emb + self.y_embed(labels))
        rope = (self.rope_cos, self.rope_sin) if self.cfg.rope else None
        hidden = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c, rope)
            if i == hidden_at:
                hidden = h
        if self.ddt is not None:  # (7.9): the head re-embeds x_t, modulated per token by the trunk's output
            v = self.unpatchify(self.ddt(patches, h, t_emb))
        else:
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
        head = None if self.ddt is None else (self.ddt.width, self.ddt.depth, self.ddt.ffn_hidden)
        per_image = forward_flops_per_image(layers, width, self.ffn_hidden, self.in_channels, self.patch,
                                            self.grid, self.t_embed.freq_dim, ddt=head)
        forward = per_image / (self.grid[0] * self.grid[1])
        return {"train": 3.0 * forward, "forward": forward, "train_per_image": 3.0 * per_image}

    def architecture(self) -> dict:
        """The DiT kind's own keys of model.json (twostage/generators/runs.py has the shared ones)."""
        layers, width, heads = self.cfg.shape
        arch = {"size": self.cfg.size, "layers": layers, "width": width, "heads": heads,
                "ffn_hidden": self.ffn_hidden, "patch_size": self.patch, "patch_grid": list(self.tokens_grid),
                "channels": self.in_channels}
        if self.ddt is not None:  # only when on: a run without the head records what it always did
            arch["ddt"] = {"width": self.ddt.width, "depth": self.ddt.depth, "heads": self.ddt.heads,
                           "ffn_hidden": self.ddt.ffn_hidden}
        return arch


def forward_flops_per_image(layers: int, width: int, ffn_hidden: int, in_channels: int, patch_size: int,
                            grid: tuple[int, int], time_freq_dim: int = 256,
                            ddt: tuple[int, int, int] | None = None) -> float:
    """Matmul FLOPs of one image's forward pass (one network evaluation; twostage/study/flops.py's convention).

    With T = (h/p)(w/p) tokens of P = in_channels * p^2 inputs each:
        per token:  4 P w (patch embedding + output layer) + L * (8 w^2 + 6 w h + 4 T w)
        per image:  2 * time_freq_dim * w + 2 w^2 (timestep MLP) + 12 L w^2 (AdaLN of each block)
                    + 4 w^2 (final AdaLN)
    The per-image terms act once on the conditioning vector, not per token (so the 6 N D rule, which
    counts them per token, overstates a DiT's compute).

    ddt = (u, D, g), the DDT head's width, depth and SwiGLU hidden size: the trunk loses its output layer
    and final AdaLN (2 P w per token, 4 w^2 per image), and the head adds per token
        2 P u (its patch embedding) + 2 w u (the projection P, when u != w)
        + D (8 u^2 + 6 u g + 4 T u) + 12 D u^2 + 4 u^2 (its AdaLN, per token) + 2 u P (output layer).
    """
    w, h, p = width, ffn_hidden, patch_size
    tokens = (grid[0] // p) * (grid[1] // p)
    inputs = in_channels * p * p
    per_token = 4 * inputs * w + layers * (8 * w * w + 6 * w * h + 4 * tokens * w)
    per_image = 2 * time_freq_dim * w + 2 * w * w + 12 * layers * w * w + 4 * w * w
    if ddt is not None:
        u, depth, g = ddt
        per_token += -2 * inputs * w + 4 * inputs * u + (2 * w * u if u != w else 0)
        per_token += depth * (8 * u * u + 6 * u * g + 4 * tokens * u) + 12 * depth * u * u + 4 * u * u
        per_image -= 4 * w * w
    return float(tokens * per_token + per_image)


def build_dit(size: str = "B", *, in_channels: int, grid: tuple[int, int], num_classes: int,
              **overrides) -> LightningDiT:
    """A LightningDiT of a named size; `overrides` are DiTModelConfig fields (patch_size=2, qk_norm=True...)."""
    return LightningDiT(DiTModelConfig(size=size, **overrides), in_channels, grid, num_classes)


# Named sizes as factories: DIT_MODELS["XL"](in_channels=32, grid=(16, 16), num_classes=1000, patch_size=1).
DIT_MODELS = {name: functools.partial(build_dit, name) for name in DIT_SHAPES}


__all__ = ["LightningDiT", "DDTHead", "DIT_MODELS", "build_dit", "sincos_2d", "POS_ORDERS", "ffn_hidden",
           "forward_flops_per_image", "TIME_SCALE"]
