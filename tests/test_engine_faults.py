"""Faults a new user hits: NaN weights behind a finite loss, resuming with changed optimizer settings,
and side work at checkpoints drawing from the training RNG."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from twostage.common.errors import UserError
from twostage.config import ConfigError
from twostage.engine import checkpoint as ckpt
from twostage.engine.optim import lr_factor
from twostage.engine.run_log import read_metrics
from twostage.engine.task import OptimConfig
from twostage.engine.trainer import NonFiniteLossError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import toy_task  # noqa: E402


def _weights(path: Path) -> tuple[dict, dict]:
    return load_file(path / "model.safetensors"), load_file(path / "ema.safetensors")


def _all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


# -- 1. non-finite weights ------------------------------------------------------------------------


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: the loss looks finite while the update poisons the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _PoisonedUpdateTask(toy_task.ToyTask):
    def main_loss(self, ctx):
        loss, logs = super().main_loss(ctx)
        return (_NaNGrad.apply(loss) if ctx.step == 9 else loss), logs


def test_nan_weights_behind_a_finite_loss_are_never_checkpointed(tmp_path):
    # Step 9's update makes the weights NaN; the loss of steps 0..9 is finite, so a loss-only check lets
    # step_0000010 be written with NaN tensors and later calls it "the last good checkpoint".
    with pytest.raises(NonFiniteLossError) as info:
        toy_task.run(str(tmp_path), 20, task_class=_PoisonedUpdateTask)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "weights of net" in message and "by step 10" in message
    assert "step_0000005" in message and "step_0000010" not in message
    assert "learning rate" in message and "--resume-with-changes" in message
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000005"]
    model, ema = _weights(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert _all_finite(model) and _all_finite(ema)


class _CorruptEMATask(toy_task.ToyTask):
    def on_checkpoint(self, step, run_dir, models):
        if step == 5:  # only the EMA copy goes bad: the loss never sees it
            with torch.no_grad():
                models["net"].head.weight.fill_(float("inf"))
        return {}


def test_non_finite_ema_weights_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"weights of ema:net became non-finite .* by step 10.*step_0000005"):
        toy_task.run(str(tmp_path), 20, task_class=_CorruptEMATask)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_0000005"


def test_huge_learning_rate_stops_with_a_followable_fix(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        toy_task.run(str(tmp_path), 10, optim={"lr": 1e30, "warmup_steps": 0, "grad_clip": None})
    message = str(info.value)
    assert "non-finite (NaN/inf)" in message
    assert "no checkpoint with finite weights" in message
    assert "optim.net.lr" in message and "--resume-with-changes" in message
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")


# -- 2. resuming with changed hyperparameters -----------------------------------------------------


def test_changed_optimizer_settings_are_refused_without_the_flag_naming_the_keys(tmp_path):
    toy_task.run(str(tmp_path), 5, optim={})
    with pytest.raises(ConfigError, match=r"different config.*optim\.net\.lr: 0\.01 -> 0\.001.*--resume-with-changes"):
        toy_task.run(str(tmp_path), 10, optim={"lr": 1e-3})


def test_model_data_or_seed_changes_are_refused_even_with_the_flag(tmp_path):
    toy_task.run(str(tmp_path), 5, optim={})
    for change in ({"seed": 1}, {"grad_accum": 2}, {"batch_size": 16}):
        with pytest.raises(ConfigError, match=r"different config") as info:
            toy_task.run(str(tmp_path), 10, optim={"lr": 1e-3}, resume_changes=True, **change)
        key = f"train.{next(iter(change))}"
        assert key in str(info.value) and "--resume-with-changes" not in str(info.value)
    # nothing was recorded or overwritten by the refused attempts
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["net"]["lr"] == 0.01
    assert "changes" not in json.loads((tmp_path / "run.json").read_text())


def test_resume_with_changes_applies_the_new_optimizer_and_continues_the_schedule(tmp_path, monkeypatch):
    old = {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.01, "grad_clip": 1.0}
    new = {"lr": 4e-3, "betas": [0.8, 0.9], "weight_decay": 0.1, "grad_clip": None, "warmup_steps": 15}
    toy_task.run(str(tmp_path), 10, optim=old)

    seen: list[tuple] = []

    def record(opt, args, kwargs):
        if type(opt) is torch.optim.AdamW:  # the net's optimizer (the critic's is Adam)
            g = opt.param_groups
            seen.append((g[0]["lr"], tuple(g[0]["betas"]), g[0]["weight_decay"], g[1]["weight_decay"]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        toy_task.run(str(tmp_path), 20, optim=new, resume_changes=True)
    finally:
        handle.remove()

    new_cfg = OptimConfig(**{**toy_task.NET_OPTIM, **new, "betas": tuple(new["betas"])})
    assert len(seen) == 10
    for i, (lr, betas, wd, wd_no_decay) in enumerate(seen):  # the schedule continues at step 10
        assert lr == pytest.approx(4e-3 * lr_factor(10 + i, new_cfg, 20), rel=1e-12)
        assert betas == (0.8, 0.9) and wd == 0.1 and wd_no_decay == 0.0
    assert seen[0][0] == pytest.approx(4e-3 * 11 / 15)  # inside the new, longer warmup
    records = {r["step"]: r for r in read_metrics(tmp_path) if "main/loss" in r}
    assert records[10]["lr/net"] == pytest.approx(1e-2 * lr_factor(10, OptimConfig(**toy_task.NET_OPTIM), 10))
    assert records[15]["lr/net"] == pytest.approx(4e-3 * lr_factor(15, new_cfg, 20))
    assert "net/grad_norm" in records[10] and "net/grad_norm" not in records[20]  # clipping now off

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"]["net"]["lr"] == 4e-3 and saved["train"]["steps"] == 20
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["changes"] == [{"step": 10, "changes": {
        "optim.net.betas": [[0.9, 0.95], [0.8, 0.9]],
        "optim.net.grad_clip": [1.0, None],
        "optim.net.lr": [0.01, 0.004],
        "optim.net.warmup_steps": [3, 15],
        "optim.net.weight_decay": [0.01, 0.1],
        "train.steps": [10, 20],
    }}]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))[2]
    group = state["optimizers"]["net"]["param_groups"][0]
    assert group["initial_lr"] == 4e-3 and tuple(group["betas"]) == (0.8, 0.9)
    assert state["schedulers"]["net"]["base_lrs"] == [4e-3, 4e-3]
    model, ema = _weights(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert _all_finite(model) and _all_finite(ema)

    # a later resume with the same (new) config is an ordinary resume; the history is kept
    toy_task.run(str(tmp_path), 25, optim=new)
    run = json.loads((tmp_path / "run.json").read_text())
    assert [c["step"] for c in run["changes"]] == [10, 20]
    assert run["changes"][1]["changes"] == {"train.steps": [20, 25]}


# -- 3. side work at checkpoints does not touch the training RNG ----------------------------------


class _Stop(Exception):
    pass


class _RandomSideWorkTask(toy_task.ToyTask):
    """on_checkpoint draws from every global RNG (like sampling a grid or a validation subset would)."""

    stop_at: int | None = None

    def on_checkpoint(self, step, run_dir, models):
        noise = torch.randn(1000)
        torch.manual_seed(1234 + step)  # tasks sometimes reseed for reproducible grids
        extra = float(noise.mean()) + float(np.random.rand()) + random.random() + float(torch.rand(()))
        if step == self.stop_at:
            raise _Stop  # the process "dies" right after the checkpoint and its side work
        return {"side/value": extra}


def test_side_work_at_checkpoints_does_not_shift_the_training_rng(tmp_path, monkeypatch):
    toy_task.run(str(tmp_path / "ref"), 20, task_class=_RandomSideWorkTask)
    monkeypatch.setattr(_RandomSideWorkTask, "stop_at", 10)
    with pytest.raises(_Stop):
        toy_task.run(str(tmp_path / "victim"), 20, task_class=_RandomSideWorkTask)
    assert ckpt.latest_checkpoint(tmp_path / "victim" / "checkpoints").name == "step_0000010"
    monkeypatch.setattr(_RandomSideWorkTask, "stop_at", None)
    toy_task.run(str(tmp_path / "victim"), 20, task_class=_RandomSideWorkTask)
    ref = _weights(ckpt.latest_checkpoint(tmp_path / "ref" / "checkpoints"))
    victim = _weights(ckpt.latest_checkpoint(tmp_path / "victim" / "checkpoints"))
    for a, b in zip(ref, victim):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
