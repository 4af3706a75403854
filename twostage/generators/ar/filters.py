"""The math of sampling from a generator's logits, shared by the AR sampler and its tests.

Everything here works on (B, V) tensors with static shapes and no host synchronization, so it can
sit inside a compiled, CUDA-graphed decoding step.

Order of operations per step (LlamaGen's): classifier-free guidance on the logits, temperature,
top-k, top-p, then a categorical draw. The draw uses the Gumbel-max identity
argmax(l - log E), E ~ Exp(1), which samples softmax(l) exactly; the noise E is drawn outside the
step from an explicit generator so that a seed reproduces a run.
"""

from __future__ import annotations

import numpy as np
import torch


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """l = l_u + s * (l_c - l_u), written as l_c + (s - 1) * (l_c - l_u).

    The two forms are equal in exact arithmetic; the second gives exactly l_c at s = 1, so guidance
    with scale 1 samples exactly what conditional sampling does.
    """
    return cond + (scale - 1.0) * (cond - uncond)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties broken by topk's order); others -inf.

    k <= 0 or k >= V keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    idx = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass is >= p.

    A token is kept iff the mass of the tokens strictly more likely than it (in sorted order) is < p,
    so the most likely token is always kept. p >= 1 keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    keep_sorted = mass_before < p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (float32 in, float32 out). Temperature 0 is left to
    `sample_logits` (greedy)."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def draw_noise(batch: int, vocab: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Exp(1) noise (batch, vocab) float32 for one Gumbel-max draw."""
    return torch.empty(batch, vocab, device=device, dtype=torch.float32).exponential_(generator=generator)


def sample_logits(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """One token per row (int64) from filtered logits: argmax(l - log E) samples softmax(l);
    temperature 0 (or no noise) takes the argmax."""
    if temperature == 0 or noise is None:
        return logits.argmax(-1)
    return (logits.float() - noise.log()).argmax(-1)


def guided_step(logits: torch.Tensor, noise: torch.Tensor | None, *, batch: int, cfg_scale: float | None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next tokens (batch,) from the logits of a (possibly CFG-doubled) batch.

    logits is (batch, V) without guidance, or (2 * batch, V) with the conditional half first and the
    unconditional half second, combined with scale `cfg_scale`.
    """
    logits = logits.float()
    if cfg_scale is not None:
        logits = cfg_logits(logits[:batch], logits[batch:], cfg_scale)
    logits = filter_logits(logits, temperature, top_k, top_p)
    return sample_logits(logits, noise, temperature)


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """n class labels with equal counts per class (METHODS 9), grouped by class: [0,0,..,1,1,..].

    When n is not a multiple of num_classes the first n % num_classes classes get one more.
    """
    if n < 0 or num_classes <= 0:
        raise ValueError(f"need n >= 0 and num_classes > 0, got {n}, {num_classes}")
    return np.sort(np.arange(n, dtype=np.int64) % num_classes, kind="stable")
