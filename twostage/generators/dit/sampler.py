"""ODE samplers of the rectified flow: Euler and Heun on a shifted time grid, with interval CFG.

Time runs from NOISE_T = 0 to DATA_T = 1 (the convention of twostage/generators/dit/flow.py). A sampler
takes a velocity function `fn(x, t) -> v` where `t` is a Python float: the grid lives on the host,
so deciding whether guidance is on at a step costs no device synchronization.

Classifier-free guidance (`guided_velocity`) combines the conditional and unconditional velocity on
**every latent channel**: v = v_u + s (v_c - v_u). (DiT / SiT / LightningDiT guide only the first 3
channels, a leftover of 4-channel SD-VAE latents that inflates their best guidance scale.) Guidance
is applied only for t in [cfg_interval_start, cfg_interval_end]; outside it the conditional
velocity alone is used, which also halves the cost of those steps.

Accuracy: Euler is first order (error O(h)), Heun second order (O(h^2), two evaluations per step).
"""

from __future__ import annotations

from typing import Callable

import torch

from twostage.generators.dit.flow import DATA_T, NOISE_T, shift_time

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
SAMPLERS = ("euler", "heun")


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 increasing times from NOISE_T to DATA_T, uniform then shifted (host floats)."""
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


def solve(fn: VelocityFn, x0: torch.Tensor, steps: int, method: str = "euler", shift: float = 1.0) -> torch.Tensor:
    """Integrate from x0 (noise, at NOISE_T) to DATA_T."""
    times = time_grid(steps, shift)
    if method == "euler":
        return euler(fn, x0, times)
    if method == "heun":
        return heun(fn, x0, times)
    raise ValueError(f"sampler {method!r}: choose one of {list(SAMPLERS)}")


def evaluations(steps: int, method: str) -> int:
    """Network evaluations (forward passes of a batch, not counting CFG doubling)."""
    return steps * (2 if method == "heun" else 1)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_u + s (v_c - v_u) on every channel, written as v_c + (s - 1)(v_c - v_u) so s = 1 is exactly v_c."""
    return cond + (scale - 1.0) * (cond - uncond)


def guidance_active(t: float, scale: float, interval: tuple[float, float]) -> bool:
    return scale != 1.0 and interval[0] <= t <= interval[1]


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
        return cfg_combine(cond, uncond, cfg_scale)

    return fn


__all__ = ["VelocityFn", "SAMPLERS", "time_grid", "euler", "heun", "solve", "evaluations", "cfg_combine",
           "guidance_active", "guided_velocity"]
