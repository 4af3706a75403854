"""The math of sampling from a generator's logits, shared by the AR sampler and its tests.

Everything here works on (B, V) tensors with static shapes and no host synchronization, so it can
sit inside a compiled, CUDA-graphed decoding step.

Order of operations per step (LlamaGen's, arXiv 2406.06525): classifier-free guidance on the
logits (twostage/generators/guidance.py), temperature, top-k, top-p, then a categorical draw. The draw
uses the Gumbel-max identity argmax(l - log E), E ~ Exp(1), which samples softmax(l) exactly; the
noise E is drawn outside the step from an explicit generator so that a seed reproduces a run.
"""

from __future__ import annotations

import torch

from twostage.generators.guidance import combine


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


def sample_logits(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """One token per row (int64) from filtered logits: argmax(l - log E) samples softmax(l);
    temperature 0 (or no noise) takes the argmax."""
    if temperature == 0 or noise is None:
        return logits.argmax(-1)
    return (logits.float() - noise.log()).argmax(-1)


def guided_step(logits: torch.Tensor, noise: torch.Tensor | None, *, batch: int, cfg_scale: float,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Next tokens (batch,) from the logits of the sampler's rows.

    logits is (batch, V) for an unguided step, or (2 * batch, V) with the conditional half first and
    the unconditional half second, combined at `cfg_scale` by the one guidance rule
    (twostage/generators/guidance.py). Which of the two it is is a static shape, so a compiled step
    specializes on it without a host synchronization.
    """
    logits = logits.float()
    if logits.shape[0] != batch:
        logits = combine(logits[:batch], logits[batch:], cfg_scale)
    logits = filter_logits(logits, temperature, top_k, top_p)
    return sample_logits(logits, noise, temperature)


__all__ = ["top_k_filter", "top_p_filter", "filter_logits", "sample_logits", "guided_step"]
