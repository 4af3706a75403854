"""Transformer layers shared by both generators: RMSNorm and the SwiGLU feed-forward.

The AR generator (LlamaGen, arXiv 2406.06525) and LightningDiT (arXiv 2501.01423) use the same two
Llama-style layers with different options: the AR model has learned norm gains, bias-free linears and
dropout; the DiT has norms without gains (its AdaLN scale already is a per-sample channel gain) and
linears with biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x) over the last dim (times `weight`), with float32 statistics, returned in x's dtype.

    The bf16 mean of squares is too coarse for the residual stream, so the statistics are float32
    whatever the autocast dtype.
    """
    out = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return out if weight is None else out * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm; `affine=False` leaves out the learned gain."""

    def __init__(self, width: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are one matmul (`gate_up`), split in halves."""

    def __init__(self, width: int, hidden: int, *, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(width, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, width, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * up))


__all__ = ["rms_norm", "RMSNorm", "SwiGLU"]
