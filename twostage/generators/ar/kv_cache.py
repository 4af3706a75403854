"""Static key/value cache for one-token-per-step decoding.

The cache is allocated once per sampling batch at its final size (batch, heads, max_len, head_dim)
and written in place, so every decoding step has the same tensor shapes and addresses: that is what
lets torch.compile specialize the step and CUDA graphs replay it without re-recording.

Reading the whole static cache each step would double the memory traffic (on average only half of
it is filled), and decoding is bound by memory bandwidth. So a step reads only a prefix of the cache
whose length is the number of filled positions rounded up to a *bucket* (e.g. 32), and masks the
few unfilled positions inside that bucket. One compiled graph serves each bucket length.

The cache lives in non-persistent buffers of a module attached to each attention layer: it never
reaches a state_dict (checkpoints), and torch.compile / CUDA graphs treat module buffers as static
memory that they may mutate in place, rather than as inputs to copy every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (batch, heads, T, head_dim) at sequence `positions` (T,) int64, in place."""
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))

    # "sdpa": the fused attention kernel with a boolean mask; "matmul": two batched matrix-vector
    # products and a softmax, which inductor can fuse with the mask (benchmarks/bench_ar.py picks).
    impl: str = "sdpa"

    def attend(self, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attention of q (batch, heads, 1, head_dim) over the first len(valid) cached positions.

        `valid` (L,) bool says which of those positions are filled (the ones after the current step
        inside the bucket are not). L is a bucket length, so one compiled graph serves many steps.
        """
        length = valid.shape[-1]
        k, v = self.k[:, :, :length], self.v[:, :, :length]
        if self.impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(1, 1, 1, length))
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~valid, float("-inf")).softmax(-1)
        return probs.to(v.dtype) @ v


def bucket_length(filled: int, bucket: int, max_len: int) -> int:
    """The cache prefix a step reads: `filled` positions rounded up to a multiple of `bucket`."""
    if bucket <= 0:
        return max_len
    return min(max_len, -(-filled // bucket) * bucket)
