"""Latent diagnostics: codebook usage/perplexity, per-position stage-2 loss, latent uniformity.

- Codebook usage and perplexity from index arrays (any shape). Usage = distinct codes used / codebook
  size; perplexity = exp(entropy of the code histogram) (= codebook size when all codes are equally
  used, 1 when one code is used).
- Per-position cross-entropy: stage-2 validation loss as a function of the token position (CRT's
  claim is that it is lower at *every* position); `PositionLoss` accumulates sums and counts over
  batches so it works on any number of batches and ranks (sum the `state()` tensors across ranks).
- Latent uniformity (VA-VAE, Yao et al. 2025, arXiv:2501.01423, Table 6): one random latent vector
  per image (channels standardized by their dataset mean/std), t-SNE to 2D, Gaussian KDE density d
  at each embedded point; report the std of d, its coefficient of variation (std/mean: scale-free,
  so comparable across embeddings), the Gini coefficient of d and the normalized entropy
  -sum p log p / log N with p = d / sum d. More uniform (lower std/Gini, entropy closer to 1) went
  with better gFID. t-SNE is stochastic: `runs` averages several seeds (the paper averages 10).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["codebook_usage", "PositionLoss", "per_position_ce", "gini", "density_uniformity",
           "sample_latent_vectors", "latent_uniformity"]


def codebook_usage(indices, codebook_size: int) -> dict[str, float]:
    """{"usage", "perplexity", "used", "entropy_bits"} of a code index array."""
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices).flatten().long()
    if idx.numel() == 0:
        raise ValueError("no indices given")
    if idx.min() < 0 or idx.max() >= codebook_size:
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{int(idx.min())}, {int(idx.max())}]")
    counts = torch.bincount(idx, minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    used = int((counts > 0).sum())
    return {"usage": used / codebook_size, "perplexity": float(np.exp(entropy)), "used": used,
            "entropy_bits": entropy / np.log(2)}


class PositionLoss:
    """Accumulates token-level cross-entropy per sequence position."""

    def __init__(self, seq_len: int):
        self.sum = torch.zeros(seq_len, dtype=torch.float64)
        self.count = torch.zeros(seq_len, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> None:
        """logits (B, T, V), targets (B, T) (mask (B, T): 1 = count this token)."""
        if logits.shape[:2] != targets.shape or targets.shape[1] != self.sum.numel():
            raise ValueError(f"logits {tuple(logits.shape)} / targets {tuple(targets.shape)} do not match "
                             f"seq_len={self.sum.numel()}")
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        m = torch.ones_like(ce) if mask is None else mask.to(ce.dtype)
        self.sum += (ce * m).sum(0).double().cpu()
        self.count += m.sum(0).double().cpu()

    def state(self) -> Tensor:
        """(2, T) tensor [sum; count] to all-reduce (sum) across ranks, then `load_state`."""
        return torch.stack([self.sum, self.count])

    def load_state(self, state: Tensor) -> None:
        self.sum, self.count = state[0].double().cpu().clone(), state[1].double().cpu().clone()

    def compute(self) -> dict[str, object]:
        per_pos = self.sum / self.count.clamp_min(1)
        per_pos[self.count == 0] = float("nan")
        return {"per_position": per_pos.tolist(), "mean": float(self.sum.sum() / self.count.sum().clamp_min(1))}


def per_position_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """One-shot mean cross-entropy per position, (T,)."""
    acc = PositionLoss(targets.shape[1])
    acc.update(logits, targets)
    return acc.sum / acc.count


def gini(values) -> float:
    """Gini coefficient of non-negative values (0 = all equal, -> 1 = all mass on one)."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0 or (x < 0).any():
        raise ValueError("gini needs a non-empty array of non-negative values")
    if x.sum() == 0:
        return 0.0
    n = x.size
    rank = np.arange(1, n + 1)
    return float(((2 * rank - n - 1) * x).sum() / (n * x.sum()))


def density_uniformity(points: np.ndarray) -> dict[str, float]:
    """Uniformity of a 2-D point cloud from Gaussian-KDE densities at the points."""
    from scipy.stats import gaussian_kde

    pts = np.asarray(points, dtype=np.float64)
    d = gaussian_kde(pts.T)(pts.T)  # Scott's bandwidth, as scipy's default
    p = d / d.sum()
    entropy = float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
    return {"density_std": float(d.std()), "density_cv": float(d.std() / d.mean()), "gini": gini(d),
            "normalized_entropy": entropy / np.log(len(d))}


def sample_latent_vectors(latents: Tensor | np.ndarray, seed: int = 0, standardize: bool = True) -> np.ndarray:
    """(N, C, H, W) latents -> (N, C): one random spatial position per image, channels standardized
    by their mean/std over the whole set (the paper uses the dataset latent statistics)."""
    z = torch.as_tensor(np.asarray(latents) if not isinstance(latents, Tensor) else latents).double()
    if z.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got {tuple(z.shape)}")
    n, c, h, w = z.shape
    if standardize:
        mean = z.mean(dim=(0, 2, 3), keepdim=True)
        std = z.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
        z = (z - mean) / std
    rng = np.random.default_rng(seed)
    hi, wi = rng.integers(0, h, n), rng.integers(0, w, n)
    return z[torch.arange(n), :, torch.as_tensor(hi), torch.as_tensor(wi)].numpy()


def latent_uniformity(latents: Tensor | np.ndarray, num: int = 10_000, runs: int = 1, seed: int = 0,
                      perplexity: float = 30.0) -> dict[str, float]:
    """VA-VAE's latent-uniformity numbers, averaged over `runs` t-SNE seeds.

    latents: (N, C, H, W) continuous latents, or (N, C) vectors already sampled. Needs scikit-learn
    (`pip install scikit-learn`) for t-SNE."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise ImportError("latent_uniformity needs scikit-learn for t-SNE: pip install scikit-learn") from e
    results = []
    for r in range(runs):
        arr = latents
        if np.ndim(arr) == 4:
            vec = sample_latent_vectors(arr, seed=seed + r)
        else:
            vec = np.asarray(arr, dtype=np.float64)
        if len(vec) > num:
            vec = vec[np.random.default_rng(seed + r).choice(len(vec), num, replace=False)]
        emb = TSNE(n_components=2, perplexity=min(perplexity, (len(vec) - 1) / 3), random_state=seed + r,
                   init="pca").fit_transform(vec)
        results.append(density_uniformity(emb))
    out = {k: float(np.mean([res[k] for res in results])) for k in results[0]}
    out["num_vectors"], out["runs"] = float(min(num, len(latents))), float(runs)
    return out
