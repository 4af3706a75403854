"""Rectified-flow math of the continuous generator (rectified flow arXiv 2209.03003, LightningDiT 2501.01423).

TIME CONVENTION (the only place it is defined; everything in twostage uses it):

    t in [0, 1],  t = 0 is pure noise,  t = 1 is data.
    x_t = t * x_1 + (1 - t) * eps          x_1 a (normalized) latent, eps ~ N(0, I)
    v   = dx_t / dt = x_1 - eps            the velocity the network predicts
    sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

`NOISE_T` and `DATA_T` name the two ends so code never hard-codes which end is which. The timestep
shift t' = s t / (1 + (s - 1) t) is written for this data-side convention: s < 1 moves the points of
a time grid towards the noise end (LightningDiT samples with s = 0.3). RAE's dimension-dependent
shift alpha = sqrt(m / n), written for noise-at-one time, is this same map with s = 1 / alpha
(`dimension_shift`); shifts compose by multiplying s.

Training losses: the MSE between predicted and target velocity plus LightningDiT's velocity-direction
loss, mean over positions of 1 - cos(v_hat, v) with the cosine taken over the channel axis. All
functions are elementwise tensor code without host synchronization.
"""

from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn.functional as F

NOISE_T = 0.0
DATA_T = 1.0



def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) times -> shape (N, 1, 1, ...) broadcastable against `like`, in like's dtype."""
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def interpolate(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * x_1 + (1 - t) * eps, per sample t of shape (N,)."""
    tt = _per_sample(t, x1)
    return tt * x1 + (1.0 - tt) * noise


def velocity_target(x1: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = x_1 - eps (constant along each straight path)."""
    return x1 - noise


def _logit_normal(n: int, mean: float, std: float, device, generator) -> torch.Tensor:
    """t = sigmoid(m + s * n), n ~ N(0, 1) (SD3 / LightningDiT): concentrates training on intermediate
    times, where the velocity is hardest to predict."""
    z = torch.randn(n, device=device, generator=generator)
    return torch.sigmoid(mean + std * z)


def _uniform(n: int, mean: float, std: float, device, generator) -> torch.Tensor:
    """t ~ U(0, 1) (plain rectified flow)."""
    return torch.rand(n, device=device, generator=generator)


# name -> sampler(n, mean, std, device, generator) of training times; `flow.time_sampling` picks one.
TIME_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"logit_normal": _logit_normal, "uniform": _uniform}


def sample_time(n: int, *, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times (n,) float32 in (0, 1) from the TIME_SAMPLERS entry `kind`."""
    if kind not in TIME_SAMPLERS:
        raise ValueError(f"time sampler {kind!r}: choose one of {list(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[kind](n, mean, std, device, generator)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """t' = s t / (1 + (s - 1) t): monotone on [0, 1], fixes 0 and 1, identity at s = 1.

    With t = 1 as data, s < 1 gives t' <= t, i.e. more of the path is spent near the noise end.
    """
    if shift <= 0:
        raise ValueError(f"the timestep shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def dimension_shift(latent_dim: int, base_dim: int | None) -> float:
    """RAE's dimension-dependent time shift (arXiv 2510.11690) as the s of `shift_time`: sqrt(n / m).

    RAE writes it with sigma = 1 as noise: alpha = sqrt(m / n), m = latent C*H*W, n = base_dim, and
    sigma' = alpha sigma / (1 + (alpha - 1) sigma). With sigma = 1 - t and t' = 1 - sigma':
        t' = 1 - alpha (1 - t) / (1 + (alpha - 1)(1 - t)) = t / (alpha - (alpha - 1) t)
           = (t / alpha) / (1 + (1 / alpha - 1) t) = shift_time(t, 1 / alpha).
    So alpha > 1 (a latent larger than the base) gives s < 1: times move towards t = 0, the noise end.
    In odds, t' / (1 - t') = s t / (1 - t): two shifts compose into their product, the inverse of s is
    1 / s. base_dim None: 1.0 (off).
    """
    if base_dim is None:
        return 1.0
    if latent_dim <= 0 or base_dim <= 0:
        raise ValueError(f"dimensions must be > 0, got latent {latent_dim} and base {base_dim}")
    return math.sqrt(base_dim / latent_dim)


def velocity_direction_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample mean over positions of 1 - cos(pred, target), cosine over channels (dim 1). (N,)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=1, eps=eps)
    return (1.0 - cos).flatten(1).mean(1)


def flow_losses(pred: torch.Tensor, target: torch.Tensor, direction_weight: float = 1.0,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"mse", "direction"}): loss = MSE + direction_weight * velocity-direction loss.

    Computed in float32: under bf16 autocast the network output is bf16 and the squared error of a
    nearly converged model would lose its low bits.
    """
    mse = (pred.float() - target.float()).pow(2).mean()
    logs = {"mse": mse.detach()}
    loss = mse
    if direction_weight > 0:
        direction = velocity_direction_loss(pred, target).mean()
        loss = loss + direction_weight * direction
        logs["direction"] = direction.detach()
    return loss, logs


__all__ = ["NOISE_T", "DATA_T", "TIME_SAMPLERS", "interpolate", "velocity_target", "sample_time", "shift_time",
           "dimension_shift", "velocity_direction_loss", "flow_losses"]
