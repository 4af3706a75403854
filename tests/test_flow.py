"""Rectified-flow math and ODE samplers (twostage/generators/dit/flow.py, sampler.py)."""

import math

import pytest
import torch

from twostage.generators import guidance
from twostage.generators.dit import flow
from twostage.generators.dit.sampler import evaluations, guidance_active, guided_velocity, solve, time_grid


def test_interpolation_ends_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x1, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    assert torch.equal(flow.interpolate(x1, eps, torch.full((3,), flow.NOISE_T)), eps)
    assert torch.equal(flow.interpolate(x1, eps, torch.full((3,), flow.DATA_T)), x1)
    v = flow.velocity_target(x1, eps)
    assert torch.allclose(v, x1 - eps)
    # the path is straight: x_t moves with constant velocity v, per-sample times broadcast
    t = torch.tensor([0.1, 0.5, 0.9])
    dt = 1e-3
    moved = (flow.interpolate(x1, eps, t + dt) - flow.interpolate(x1, eps, t)) / dt
    assert torch.allclose(moved, v, atol=1e-2)


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(20000, generator=g)
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1) < 0.05
    u = flow.sample_time(1000, kind="uniform", generator=g)
    assert (u >= 0).all() and (u < 1).all()
    with pytest.raises(ValueError, match="time sampler"):
        flow.sample_time(2, kind="beta")
    assert set(flow.TIME_SAMPLERS) == {"logit_normal", "uniform"}


@pytest.mark.parametrize("shift", [0.3, 1.0, 3.0])
def test_shift_is_monotone_and_fixes_the_ends(shift):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = flow.shift_time(t, shift)
    assert float(s[0]) == 0.0 and float(s[-1]) == pytest.approx(1.0, abs=1e-15)
    assert (s.diff() > 0).all()
    if shift < 1:  # data-side convention: s < 1 spends more of the path near the noise end
        assert (s[1:-1] < t[1:-1]).all()
    grid = time_grid(10, shift)
    assert len(grid) == 11 and grid[0] == 0.0 and grid[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        flow.shift_time(t, 0.0)


def test_losses():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 8, 3, 3, generator=g)
    loss, logs = flow.flow_losses(v, v)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(logs["direction"]) == pytest.approx(0.0, abs=1e-6)
    # the direction loss ignores the length of the prediction and sees its direction only
    assert torch.allclose(flow.velocity_direction_loss(3 * v, v), torch.zeros(2), atol=1e-6)
    assert torch.allclose(flow.velocity_direction_loss(-v, v), torch.full((2,), 2.0), atol=1e-6)
    pred = torch.randn(2, 8, 3, 3, generator=g)
    loss, logs = flow.flow_losses(pred, v, direction_weight=0.5)
    assert float(loss) == pytest.approx(float(logs["mse"] + 0.5 * logs["direction"]))
    _, logs = flow.flow_losses(pred, v, direction_weight=0.0)
    assert "direction" not in logs


def _linear_error(method: str, steps: int, a: float = -1.5) -> float:
    x0 = torch.ones(1, dtype=torch.float64)
    out = solve(lambda x, t: a * x, x0, steps, method)
    return abs(float(out) - math.exp(a))


def test_euler_first_order_heun_second_order():
    e1, e2 = _linear_error("euler", 20), _linear_error("euler", 40)
    h1, h2 = _linear_error("heun", 20), _linear_error("heun", 40)
    assert 1.8 < e1 / e2 < 2.2  # O(h)
    assert 3.6 < h1 / h2 < 4.4  # O(h^2)
    assert h1 < e1 / 20
    # time-dependent field: dx/dt = 2t integrates to x0 + 1 (Heun exact for linear-in-t slopes)
    out = solve(lambda x, t: torch.full_like(x, 2 * t), torch.zeros(1, dtype=torch.float64), 7, "heun", shift=0.3)
    assert float(out) == pytest.approx(1.0, abs=1e-12)
    assert evaluations(10, "heun") == 20 and evaluations(10, "euler") == 10
    with pytest.raises(ValueError, match="sampler"):
        solve(lambda x, t: x, torch.zeros(1), 2, "rk4")


def test_cfg_changes_every_channel_and_respects_the_interval():
    calls = []

    def model(x, t, y):  # conditional output differs from unconditional on every channel
        calls.append(x.shape[0])
        return x + (y != 10).float().view(-1, 1, 1, 1) * torch.arange(1, x.shape[1] + 1.0).view(1, -1, 1, 1)

    x = torch.zeros(2, 6, 2, 2)
    labels = torch.tensor([3, 4])
    cond = model(x, None, labels)
    fn = guided_velocity(model, labels, null_label=10, cfg_scale=2.0, interval=(0.1, 1.0))
    guided = fn(x, 0.5)
    assert calls[-1] == 4  # one doubled forward pass
    diff = (guided - cond).abs().amax(dim=(0, 2, 3))
    assert (diff > 0).all()  # all 6 channels guided, not just the first 3
    assert torch.allclose(guided, guidance.combine(cond, x, 2.0))  # the AR sampler's rule, on velocities
    assert torch.equal(fn(x, 0.05), cond) and calls[-1] == 2  # noisiest part: no guidance, no doubling
    assert torch.equal(guided_velocity(model, labels, 10, 1.0)(x, 0.5), cond) and calls[-1] == 2  # 1: no guidance
    unconditional = guided_velocity(model, labels, 10, 0.0)(x, 0.5)  # 0: the unconditional velocity
    assert calls[-1] == 4 and torch.equal(unconditional, model(x, None, torch.tensor([10, 10])))
    assert not guidance_active(0.5, 1.0, (0, 1)) and guidance_active(0.1, 1.5, (0.1, 1.0))
    assert guidance_active(0.5, 0.0, (0, 1))
