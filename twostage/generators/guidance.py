"""Classifier-free guidance (Ho & Salimans, arXiv 2207.12598): the one rule every layer uses.

    scale None   the run's configured default (`sample.cfg_scale`)
    scale 1      no guidance: the conditional model alone, no doubled batch
    scale s      out = uncond + s * (cond - uncond), on logits (AR) or velocities (flow)
                 (s = 0 is the purely unconditional model; s > 1 sharpens towards the class)

The CLI, the Python API, `sample_run` of each kind, the samplers and the checkpoint grids all pass
the scale through unchanged; only `resolve_scale` fills in the default, and only `active` decides
whether the batch is doubled.
"""

from __future__ import annotations

import math

import torch

from twostage.config import ConfigError

NO_GUIDANCE = 1.0


def check_scale(scale: float) -> float:
    """`scale` as a float; it must be finite and >= 0."""
    s = float(scale)
    if not (math.isfinite(s) and s >= 0):
        raise ConfigError(f"CFG scale {s}: must be >= 0 (1: no guidance, 0: unconditional, > 1: guided)")
    return s


def resolve_scale(scale: float | None, default: float) -> float:
    """The scale to sample with: `scale`, or the run's `default` (its sample.cfg_scale) when None."""
    return check_scale(default if scale is None else scale)


def active(scale: float) -> bool:
    """Whether sampling at `scale` needs the unconditional model, i.e. a doubled batch."""
    return scale != NO_GUIDANCE


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond), on every channel / logit.

    torch.lerp evaluates it as uncond + s (cond - uncond) for s < 0.5 and as cond + (s - 1)(cond -
    uncond) otherwise, so s = 0 gives exactly `uncond` and s = 1 exactly `cond` (also compiled).
    """
    return torch.lerp(uncond, cond, scale)


__all__ = ["NO_GUIDANCE", "check_scale", "resolve_scale", "active", "combine"]
