"""Class-conditional Llama-style autoregressive transformer over VQ codes (LlamaGen GPT, arXiv 2406.06525).

    model = AR_MODELS["B"](vocab_size=16384, num_classes=1000, grid=(16, 16))
    logits = model(tokens, labels)                  # (B, N, V): [class, z_0..z_{N-2}] -> z_0..z_{N-1}
    ce = model(tokens, labels, per_token_loss=True)  # (B, N) float32 cross-entropy

Blocks are pre-norm (RMSNorm) with fused-qkv attention through scaled_dot_product_attention (flash
attention on GPUs), 2D RoPE on the token grid (twostage/nn/rope.py; the class prefix unrotated, or with
`model.prefix_rope=zero` its queries and keys zeroed as in LlamaGen) and a
SwiGLU feed-forward whose gate and up projections are one matrix (twostage/nn/layers.py). The label
embedding has num_classes + 1 rows: the last is the null class of classifier-free guidance (arXiv
2207.12598; label dropout happens in the training task).

Decoding (sampler.py) uses the same modules with a static KV cache: `setup_caches`, then
`prefill(labels)` for the class prefix and `decode(tokens, pos, kv_positions)` for one token a step.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from twostage.generators.ar.config import AR_SHAPES, ARModelConfig
from twostage.generators.ar.kv_cache import KVCache
from twostage.nn.layers import RMSNorm, SwiGLU
from twostage.nn.rope import apply_rope, rope_2d_tables

PREFIX = 1  # one class token


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.attn_dropout = attn_dropout
        self.drop = nn.Dropout(resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache_pos: torch.Tensor | None = None, kv_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, head_dim)
        if cache_pos is None:  # training / full sequence
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            self.kv_cache.write(cache_pos, k, v)
            if kv_valid is None:  # prefill from position 0: causal within the new tokens
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # one decoding step over the cached prefix
                out = self.kv_cache.attend(q, kv_valid)
        out = out.transpose(1, 2).reshape(b, t, width)
        return self.drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, cfg: ARModelConfig):
        super().__init__()
        _, width, heads = cfg.shape
        self.attn_norm = RMSNorm(width, cfg.norm_eps)
        self.attn = Attention(width, heads, cfg.attn_dropout, cfg.resid_dropout)
        self.ffn_norm = RMSNorm(width, cfg.norm_eps)
        self.ffn = SwiGLU(width, cfg.ffn_hidden, bias=False, dropout=cfg.ffn_dropout)

    def forward(self, x, cos, sin, cache_pos=None, kv_valid=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache_pos, kv_valid)
        return x + self.ffn(self.ffn_norm(x))


class ARTransformer(nn.Module):
    shard_units = ("blocks",)  # FSDP units: each block (twostage/engine/fsdp.py)

    def __init__(self, cfg: ARModelConfig, vocab_size: int, num_classes: int, grid: tuple[int, int]):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.num_classes, self.grid = vocab_size, num_classes, tuple(grid)
        self.num_tokens = grid[0] * grid[1]
        self.seq_len = PREFIX - 1 + self.num_tokens  # [class, z_0..z_{N-2}]
        layers, width, heads = cfg.shape
        self.width, self.head_dim = width, width // heads
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.cls_emb = nn.Embedding(num_classes + 1, width)  # last row: null class
        self.emb_drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))
        self.norm = RMSNorm(width, cfg.norm_eps)
        self.head = nn.Linear(width, vocab_size, bias=False)
        cos, sin = rope_2d_tables(self.grid, self.head_dim, PREFIX, cfg.rope_base, cfg.prefix_rope)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.head.weight)  # start at uniform predictions (LlamaGen)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would round the RoPE tables to 3 significant digits; rebuild them in fp32.
        super()._apply(fn, recurse)
        cos, sin = rope_2d_tables(self.grid, self.head_dim, PREFIX, self.cfg.rope_base, self.cfg.prefix_rope)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    # -- full sequence (training, validation) ---------------------------------------------------------

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, per_token_loss: bool = False) -> torch.Tensor:
        """tokens (B, N) int64 codes in raster order, labels (B,) int64 (null_class for unconditional).

        Returns logits (B, N, V) for z_0..z_{N-1}, or with per_token_loss their cross-entropy against
        `tokens` (B, N) float32 (computed here so that a compiled model fuses it with the head).
        """
        b, n = tokens.shape
        if n > self.num_tokens:
            raise ValueError(f"got {n} tokens per sequence but the model was built for a {self.grid} grid")
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(tokens[:, :-1])], dim=1)
        x = self.emb_drop(x)
        cos, sin = self.rope_cos[:n, None], self.rope_sin[:n, None]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        if not per_token_loss:
            return logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
        return ce.view(b, n)

    # -- cached decoding ------------------------------------------------------------------------------

    def setup_caches(self, batch: int, dtype: torch.dtype | None = None) -> None:
        """Attach a static KV cache for `batch` sequences to every attention layer."""
        dtype = dtype or self.head.weight.dtype
        device = self.head.weight.device
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, block.attn.heads, self.seq_len, self.head_dim, dtype, device)

    def has_caches(self, batch: int, dtype: torch.dtype | None = None) -> bool:
        cache = self.blocks[0].attn.kv_cache
        dtype = dtype or self.head.weight.dtype
        return cache is not None and cache.batch == batch and cache.k.dtype == dtype \
            and cache.k.device == self.head.weight.device

    def clear_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Write the class prefix into the caches; logits (B, V) for z_0."""
        x = self.cls_emb(labels)[:, None]
        pos = torch.arange(PREFIX, device=x.device)
        cos, sin = self.rope_cos[:PREFIX, None], self.rope_sin[:PREFIX, None]
        for block in self.blocks:
            x = block(x, cos, sin, cache_pos=pos)
        return self.head(self.norm(x[:, -1]))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        """One step: feed tokens (B,) at sequence position `pos` (0-d int64 tensor, >= PREFIX).

        kv_positions (L,) = arange(L): the cache prefix to attend over (L >= pos + 1, a bucket
        length); passing it as a tensor keeps `pos` out of the compiled graph's specialization.
        Returns logits (B, V) for the token after the one fed.
        """
        x = self.tok_emb(tokens)[:, None]
        cache_pos = pos.view(1)
        cos, sin = self.rope_cos[cache_pos][:, None], self.rope_sin[cache_pos][:, None]
        valid = kv_positions <= pos
        for block in self.blocks:
            x = block(x, cos, sin, cache_pos=cache_pos, kv_valid=valid)
        return self.head(self.norm(x[:, 0]))

    # -- accounting -----------------------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        embedding = self.tok_emb.weight.numel() + self.cls_emb.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def flops_per_token(self) -> dict[str, float]:
        """Training and forward FLOPs per token (`forward_flops_per_token`; training = 3 x forward)."""
        layers, width, _ = self.cfg.shape
        forward = forward_flops_per_token(layers, width, self.cfg.ffn_hidden, self.vocab_size, self.seq_len)
        return {"train": 3.0 * forward, "forward": forward}

    def architecture(self) -> dict:
        """The AR kind's own keys of model.json (twostage/generators/runs.py has the shared ones)."""
        layers, width, heads = self.cfg.shape
        return {"size": self.cfg.size, "layers": layers, "width": width, "heads": heads,
                "ffn_hidden": self.cfg.ffn_hidden, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "flops_formula": "train = 6*N_matmul + 12*layers*width*seq_len per token"}


def forward_flops_per_token(layers: int, width: int, ffn_hidden: int, vocab_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward pass (2 per multiply-add; twostage/study/flops.py's convention).

    Per layer: qkv 6 w^2, output 2 w^2, SwiGLU gate+up 4 w h and down 2 h w, attention scores and
    the weighted sum 4 T w (the full T x T square, as in PaLM's MFU accounting, not halved for the
    causal mask); then the head 2 w V. That is 2 N + 4 L w T with N the matmul parameters
    (`matmul_parameters`), so training = 6 N + 12 L w T: the classic 6 N D plus the attention term.
    Embedding lookups and norms do no matmuls and are left out.
    """
    w, h = width, ffn_hidden
    per_layer = 8 * w * w + 6 * w * h + 4 * seq_len * w
    return float(layers * per_layer + 2 * w * vocab_size)


def matmul_parameters(layers: int, width: int, ffn_hidden: int, vocab_size: int) -> int:
    """Parameters of the model's matmuls (N of 6 N D): blocks and output head, no embeddings or norms."""
    w, h = width, ffn_hidden
    return layers * (4 * w * w + 3 * w * h) + w * vocab_size


def build_ar(size: str, vocab_size: int, num_classes: int, grid: tuple[int, int], **overrides) -> ARTransformer:
    """An AR transformer of a named size; `overrides` are ARModelConfig fields (dropouts, ...)."""
    return ARTransformer(ARModelConfig(size=size, **overrides), vocab_size, num_classes, grid)


# DiT-style registry: one factory per named size, e.g. AR_MODELS["L"](vocab_size=..., num_classes=..., grid=...).
AR_MODELS: dict[str, Callable[..., ARTransformer]] = {name: functools.partial(build_ar, name) for name in AR_SHAPES}


__all__ = ["PREFIX", "ARTransformer", "AR_MODELS", "build_ar", "forward_flops_per_token", "matmul_parameters"]
