"""ODE samplers of the rectified flow: Euler and Heun on a shifted time grid, with interval CFG.

Time runs from NOISE_T = 0 to DATA_T = 1 (the convention of twostage/generators/dit/flow.py). A sampler
takes a velocity function `fn(x, t) -> v` where `t` is a Python float: the grid lives on the host,
so deciding whether guidance is on at a step costs no device synchronization.

Classifier-free guidance (`guided_velocity`, the one rule of twostage/generators/guidance.py)
combines the conditional and unconditional velocity on **every latent channel**: v = v_u + s (v_c - v_u). (DiT / SiT / LightningDiT guide only the first 3
channels, a leftover of 4-channel SD-VAE latents that inflates their best guidance scale.) Guidance
is applied only for t in [cfg_interval_start, cfg_interval_end] (LightningDiT, arXiv 2501.01423);
outside it, and everywhere at scale 1, the conditional velocity alone is used, which also halves the
cost of those steps.

Accuracy: Euler is first order (error O(h)), Heun second order (O(h^2), two evaluations per step).
"""

from __future__ import annotations

from typing import Callable

import torch

from twostage.generators import guidance
from twostage.generators.dit.flow import DATA_T, NOISE_T, shift_time

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 increasing times from NOISE_T to DATA_T, uniform then shifted (host floats).

    `shift` is the one s of flow.shift_time; a run trained with RAE's dimension-dependent shift passes
    sample.shift times flow.dimension_shift (shifts compose by multiplying; generate_latents does this).
    """
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    return [float(shift_time(NOISE_T + (DATA_T - NOISE_T) * i / steps, shift)) for i in range(steps + 1)]


def euler(fn: VelocityFn, x: torch.Tensor, times: list[float]) -> torch.Tensor:
    for t0, t1 in zip(times[:-1], times[1:]):
        x = x + (t1 - t0) * fn(x, t0)
    return x


def heun(fn: VelocityFn, x: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Heun's method (explicit trapezoid): Euler predictor, then the average of both slopes."""
    for t0, t1 in zip(times[:-1], times[1:]):
        h = t1 - t0
        d0 = fn(x, t0)
        d1 = fn(x + h * d0, t1)
        x = x + 0.5 * h * (d0 + d1)
    return x


# name -> integrator(fn, x, times); `sample.sampler` picks one.
SAMPLERS: dict[str, Callable[[VelocityFn, torch.Tensor, list[float]], torch.Tensor]] = {"euler": euler, "heun": heun}
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2}


def solve(fn: VelocityFn, x0: torch.Tensor, steps: int, method: str = "euler", shift: float = 1.0) -> torch.Tensor:
    """Integrate from x0 (noise, at NOISE_T) to DATA_T."""
    if method not in SAMPLERS:
        raise ValueError(f"sampler {method!r}: choose one of {list(SAMPLERS)}")
    return SAMPLERS[method](fn, x0, time_grid(steps, shift))


def evaluations(steps: int, method: str) -> int:
    """Network evaluations (forward passes of a batch, not counting CFG doubling)."""
    return steps * EVALUATIONS_PER_STEP[method]


def guidance_active(t: float, scale: float, interval: tuple[float, float]) -> bool:
    """Whether the step at time t runs the doubled batch: a guiding scale and t inside the interval."""
    return guidance.active(scale) and interval[0] <= t <= interval[1]


def guided_velocity(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                    labels: torch.Tensor, null_label: int, cfg_scale: float = 1.0,
                    interval: tuple[float, float] = (0.0, 1.0)) -> VelocityFn:
    """A velocity function over `model(x, t (N,), labels (N,)) -> v`, guided inside `interval`.

    With guidance on, one forward pass runs the doubled batch [conditional; null class].
    """
    n = labels.shape[0]
    doubled = torch.cat([labels, torch.full_like(labels, null_label)])

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        if not guidance_active(t, cfg_scale, interval):
            return model(x, torch.full((n,), t, device=x.device), labels).float()
        tt = torch.full((2 * n,), t, device=x.device)
        out = model(torch.cat([x, x]), tt, doubled).float()
        cond, uncond = out.chunk(2)
        return guidance.combine(cond, uncond, cfg_scale)

    return fn


__all__ = ["VelocityFn", "SAMPLERS", "time_grid", "euler", "heun", "solve", "evaluations", "guidance_active",
           "guided_velocity"]
