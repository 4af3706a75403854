"""Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991), k = 3.

Each real feature gets a ball whose radius is the distance to its k-th nearest *other* real feature;
the real manifold is the union of those balls. Precision = fraction of generated features inside
the real manifold (fidelity); recall = fraction of real features inside the generated manifold
(built the same way from the generated set; coverage). Both sets should be the same size
(the ADM evaluator uses 10k / 50k); distances are Euclidean in feature space.

Distances are computed in row blocks (an N x N matrix of 50k samples would be 10 GB) in float32 on
the given device via ||a||^2 + ||b||^2 - 2 a.b; float32 is enough for nearest-neighbour ranks, and
the radii comparison uses the same arithmetic on both sides.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_radii", "manifold_fraction", "precision_recall"]


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) + b_sq[None] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def knn_radii(feats: torch.Tensor, k: int = 3, block: int = 2048) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour among the *other* rows."""
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples, got {feats.shape[0]}")
    sq = (feats * feats).sum(1)
    out = []
    for i in range(0, feats.shape[0], block):
        d = _sq_dists(feats[i : i + block], feats, sq)
        # k+1-th smallest includes the point itself (distance 0)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def manifold_fraction(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor,
                      block: int = 2048) -> float:
    """Fraction of `queries` inside at least one ball (center in `manifold`, squared radius `radii`)."""
    sq = (manifold * manifold).sum(1)
    inside = 0
    for i in range(0, queries.shape[0], block):
        d = _sq_dists(queries[i : i + block], manifold, sq)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / queries.shape[0]


@torch.no_grad()
def precision_recall(real, fake, k: int = 3, device: str | torch.device = "cpu",
                     block: int = 2048) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real`, both (N, D) feature matrices."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"feature matrices must be (N, D) with equal D, got {tuple(r.shape)}, {tuple(f.shape)}")
    precision = manifold_fraction(r, knn_radii(r, k, block), f, block)
    recall = manifold_fraction(f, knn_radii(f, k, block), r, block)
    return precision, recall
