"""Inception-Score-style score: exp E_x KL(p(y|x) || p(y)), averaged over splits.

(Salimans et al. 2016, arXiv:1606.03498, section 4.)

With Inception-v3 logits this is the Inception Score (IS); with any other classifier it is
"IS-<network>" (e.g. IS-EffNetLite0 over 1000 ImageNet classes) and not comparable to IS.
Conventions (ADM evaluator / StyleGAN): 10 splits, p(y) per split, mean and std over splits; for
Inception-v3 the logits omit the output bias (see twostage/backbones/inception.py).

Order matters: the splits are consecutive chunks, and sample files are written grouped by class
(balanced labels, sorted: docs/methods.md (8.5)), so consecutive chunks hold about one class each,
p(y) per chunk is nearly one-hot and the score collapses towards 1. Pass `shuffle_seed` to permute
the samples with that seed first (as torch-fidelity does); the generation metrics always do
(seed recorded in the protocol). Without it the chunks are consecutive (the ADM evaluator's rule,
right only for samples in random order).
Bounds: 1 (every sample gets the same prediction) .. K (confident predictions, classes uniform).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["inception_score"]


def inception_score(logits=None, *, probs=None, splits: int = 10,
                    shuffle_seed: int | None = None) -> tuple[float, float]:
    """(mean, std) over `splits` chunks. Give logits (N, K) or probabilities (N, K).

    shuffle_seed: permute the samples with np.random.default_rng(shuffle_seed) before cutting them
    into consecutive chunks (None: keep the given order)."""
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits= or probs=")
    if logits is not None:
        logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    else:
        p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
        if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-4):
            raise ValueError("probs must be non-negative rows summing to 1 (pass raw scores as logits=)")
        logp = torch.log(p.clamp_min(0))  # log 0 = -inf is handled by the p > 0 mask below
    n = logp.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits")
    if shuffle_seed is not None:
        logp = logp[torch.from_numpy(np.random.default_rng(shuffle_seed).permutation(n))]
    scores = []
    for chunk in torch.tensor_split(logp, splits):
        p = chunk.exp()
        log_py = torch.log(p.mean(0))
        # KL(p || p_y) with 0 log 0 = 0 (one-hot predictions have exact zeros)
        kl = torch.where(p > 0, p * (chunk - log_py), torch.zeros_like(p)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
