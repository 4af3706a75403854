"""Vector quantizer (LlamaGen VQ recipe) and codebook-usage statistics.

The lookup is cosine by default: latent vectors and codebook entries are both l2-normalized before
the nearest-code search, and the decoder receives the normalized code. Low code dimension (8) plus
normalized lookup is what keeps ~97% of a 16k codebook alive (LlamaGen arXiv:2406.06525; docs/methods.md (2.1)-(2.3)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):  # a NamedTuple so torch.compile traces it without graph breaks
    z_q: torch.Tensor  # (N, D, h, w), straight-through: forward = code, backward = identity to z
    indices: torch.Tensor  # (N, h, w) int64
    z: torch.Tensor  # (N, D, h, w) the pre-quantization latent as used by the lookup (normalized if l2)
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor  # already multiplied by the commitment weight (beta)
    entropy_loss: torch.Tensor  # already multiplied by its weight; 0 when disabled

    @property
    def loss(self) -> torch.Tensor:
        return self.codebook_loss + self.commit_loss + self.entropy_loss


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        l2_norm: bool = True,
        commit_weight: float = 0.25,
        codebook_weight: float = 1.0,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.l2_norm = l2_norm
        self.commit_weight = commit_weight
        self.codebook_weight = codebook_weight
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:  # start on the unit sphere, where the lookup lives
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> torch.Tensor:
        """The codebook as the lookup sees it (normalized if l2), float32."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Index of the nearest code for each row of `flat` (M, D), searched in float32.

        Chunked over rows so the (M, K) distance matrix never exceeds chunk*K floats.
        """
        codes = self.codebook()
        flat = flat.float()
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        code_sq = (codes * codes).sum(-1)
        out = []
        for part in flat.split(chunk):
            # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e ; ||z||^2 does not change the argmin
            dist = torch.addmm(code_sq.unsqueeze(0), part, codes.t(), alpha=-2.0)
            out.append(dist.argmin(dim=-1))
        return torch.cat(out) if len(out) > 1 else out[0]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (...,) -> (..., D), normalized if l2."""
        codes = self.embedding(indices)
        return F.normalize(codes, dim=-1) if self.l2_norm else codes

    def indices_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, h, w) indices -> (N, D, h, w) quantized latent."""
        return self.lookup(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        # Quantizer maths in float32: bf16 distances/normalization would flip nearest codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.l2_norm:
                z = F.normalize(z, dim=1)
            n, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            indices = self.nearest(flat)
            z_q = self.lookup(indices).float().view(n, h, w, d).permute(0, 3, 1, 2)
            codebook_loss = self.codebook_weight * F.mse_loss(z_q, z.detach())
            commit_loss = self.commit_weight * F.mse_loss(z, z_q.detach())
            if self.entropy_weight > 0:
                entropy = self.entropy_weight * self._entropy_loss(flat)
            else:
                entropy = z.new_zeros(())
            z_st = z + (z_q - z).detach()  # straight-through estimator
        return QuantizerOutput(z_st, indices.view(n, h, w), z, codebook_loss, commit_loss, entropy)

    def _entropy_loss(self, flat: torch.Tensor) -> torch.Tensor:
        """MaskGIT-style: low per-sample entropy (confident assignment), high batch-average entropy
        (spread over the codebook). Costs an (M, K) softmax, so it is off by default."""
        codes = self.codebook()
        dist = (flat * flat).sum(-1, keepdim=True) + (codes * codes).sum(-1) - 2 * flat @ codes.t()
        logits = -dist / self.entropy_temperature
        probs = logits.softmax(-1)
        log_probs = logits.log_softmax(-1)
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        avg = probs.mean(0)
        avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
        return sample_entropy - avg_entropy


# ---------------------------------------------------------------------------------------------------
# usage statistics


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Histogram (K,) float32 of code indices. index_add_ instead of torch.bincount: bincount reads the
    maximum index back to the host on CUDA (a sync per call); this stays asynchronous."""
    flat = indices.flatten()
    counts = torch.zeros(codebook_size, dtype=torch.float32, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Fraction of the codebook that occurs in `indices` (a tensor; no host sync)."""
    return (code_counts(indices, codebook_size) > 0).float().mean()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the empirical code distribution: K for uniform use of K codes, 1 for collapse."""
    p = counts.float() / counts.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return torch.exp(entropy)


def perplexity(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    return perplexity_from_counts(code_counts(indices, codebook_size))


NEVER = -(2**62)  # "last seen" of a code that never occurred


class CodebookUsage:
    """Codebook usage over a window of recent steps, kept on the device without host syncs.

    `last_seen[k]` is the last step at which code k was chosen (index_fill_ with a Python int, so the
    update is asynchronous); usage = fraction of codes seen in the last `window` steps. A decayed
    histogram (time constant = window) gives a window perplexity. Counts are per process: under data
    parallelism each rank reports its own shard's usage.
    """

    def __init__(self, codebook_size: int, window: int = 100) -> None:
        self.codebook_size = codebook_size
        self.window = window
        self.decay = math.exp(-1.0 / window)
        self.last_seen: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None

    def _init(self, device: torch.device) -> None:
        if self.last_seen is None:
            self.last_seen = torch.full((self.codebook_size,), NEVER, dtype=torch.int64, device=device)
            self.hist = torch.zeros(self.codebook_size, dtype=torch.float32, device=device)
        elif self.last_seen.device != device:  # e.g. state restored on CPU, training on GPU
            self.last_seen = self.last_seen.to(device)
            self.hist = self.hist.to(device)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Record one batch of indices at `step`; returns batch and window statistics (tensors)."""
        self._init(indices.device)
        flat = indices.flatten()
        counts = code_counts(flat, self.codebook_size)
        self.last_seen.index_fill_(0, flat, int(step))
        self.hist.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        return {
            "batch_usage": (counts > 0).float().mean(),
            "batch_perplexity": perplexity_from_counts(counts),
            "usage": self.usage(step),
            "perplexity": perplexity_from_counts(self.hist),
        }

    @torch.no_grad()
    def usage(self, step: int) -> torch.Tensor:
        assert self.last_seen is not None, "update() first"
        return (self.last_seen > int(step) - self.window).float().mean()

    def state_dict(self) -> dict:
        """JSON-able; costs one host sync, so only call it at checkpoints."""
        if self.last_seen is None:
            return {}
        seen = self.last_seen.cpu()
        used = torch.nonzero(seen > NEVER).flatten()
        return {
            "codes": used.tolist(),
            "last_seen": seen[used].tolist(),
            "hist": self.hist.cpu().tolist(),
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if not state:
            return
        self.last_seen = None
        self._init(torch.device(device))
        codes = torch.tensor(state["codes"], dtype=torch.int64, device=self.last_seen.device)
        seen = torch.tensor(state["last_seen"], dtype=torch.int64, device=self.last_seen.device)
        self.last_seen[codes] = seen
        self.hist.copy_(torch.tensor(state["hist"], dtype=torch.float32))
