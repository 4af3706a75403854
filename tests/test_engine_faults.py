"""Faults a new user hits: NaN weights behind a finite loss, resuming with changed optimizer settings,
side work at checkpoints drawing from the training RNG, a refused resume writing into the run folder, and
a full disk while training."""

from __future__ import annotations

import json
import os
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


# -- 4. a refused resume writes nothing; the task's start hook ------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder` (the folder too): its mtime and, for a file, its bytes. A
    new file (a TensorBoard events file) changes its folder's mtime, a rewrite the file's."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted([folder, *folder.rglob("*")])}


def test_a_refused_resume_leaves_the_run_folder_byte_identical(tmp_path):
    toy_task.run(str(tmp_path), 5, optim={})
    before = _snapshot(tmp_path)
    assert any(name.startswith("tb/") for name in before)
    for refused in ({"seed": 1}, {"optim": {"lr": 1e-3}}, {"batch_size": 16, "resume_changes": True}):
        with pytest.raises(ConfigError, match="different config"):
            toy_task.run(str(tmp_path), 10, **{"optim": {}, **refused})
        assert _snapshot(tmp_path) == before, refused
    # an unreadable checkpoint is refused too, and nothing is written either
    (tmp_path / "checkpoints" / "step_0000005" / "optim.safetensors").write_bytes(b"garbage")
    before = _snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        toy_task.run(str(tmp_path), 10, optim={})
    assert _snapshot(tmp_path) == before


class _HookTask(toy_task.ToyTask):
    """Records each on_start call: (run folder, resumed, losses computed before it, the net's head weight)."""

    calls: list = []
    losses = 0

    def on_start(self, run_dir, resumed):
        self.calls.append((Path(run_dir), resumed, self.losses, self.modules["net"].head.weight.detach().clone()))

    def main_loss(self, ctx):
        type(self).losses += 1
        return super().main_loss(ctx)


def test_on_start_is_called_once_after_the_checks_and_before_the_first_step(tmp_path, monkeypatch):
    from twostage.engine.task import TaskBase

    assert TaskBase().on_start(tmp_path, False) is None  # the default does nothing
    monkeypatch.setattr(_HookTask, "calls", [])
    monkeypatch.setattr(_HookTask, "losses", 0)
    toy_task.run(str(tmp_path), 5, task_class=_HookTask)
    assert [(d, r, n) for d, r, n, _ in _HookTask.calls] == [(tmp_path, False, 0)]
    losses = _HookTask.losses
    with pytest.raises(ConfigError):  # refused: the hook is not called
        toy_task.run(str(tmp_path), 10, task_class=_HookTask, seed=3)
    assert len(_HookTask.calls) == 1
    toy_task.run(str(tmp_path), 10, task_class=_HookTask)
    (run_dir, resumed, seen, head), = _HookTask.calls[1:]
    assert run_dir == tmp_path and resumed and seen == losses  # before the resumed run's first step
    saved = load_file(tmp_path / "checkpoints" / "step_0000005" / "model.safetensors")
    assert torch.equal(head, saved["net.head.weight"])  # the checkpoint was loaded before the hook


# -- 5. a full disk ---------------------------------------------------------------------------------


ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


def test_disk_full_while_checkpointing_is_one_line_naming_the_checkpoint_kept(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    real_save = ckpt.save_file

    def save_file(tensors, filename, *a, **k):
        if "step_0000010" in filename and filename.endswith("ema.safetensors"):
            Path(filename).write_bytes(b"half a file")
            raise SafetensorError(ENOSPC_MESSAGE)
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(UserError) as info:
        toy_task.run(str(tmp_path), 15)
    message = str(info.value)
    assert "\n" not in message and "no space left" in message.lower() and str(tmp_path) in message
    assert "ema.safetensors" in message and f"{tmp_path / 'checkpoints' / 'step_0000005'}" in message
    assert "Free some space" in message and "--out" in message
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000005"]  # no half-written folder
    monkeypatch.setattr(ckpt, "save_file", real_save)
    toy_task.run(str(tmp_path), 15)  # space freed: the same call resumes and finishes
    assert ckpt.latest_checkpoint(folder).name == "step_0000015"
    assert [r["step"] for r in read_metrics(tmp_path) if "main/loss" in r] == [5, 10, 15]


_FULL_DISK_SCRIPT = r"""
import json, sys
from pathlib import Path

sys.path.insert(0, sys.argv[2])
import toy_task
from twostage.common.errors import UserError
from twostage.engine import checkpoint as ckpt
from twostage.engine.run_log import read_metrics

disk = Path(sys.argv[1])
run = disk / "run"


class FillsTheDisk(toy_task.ToyTask):
    def on_checkpoint(self, step, run_dir, models):
        if step == 5:  # another program takes the rest of the disk
            with open(disk / "filler", "wb", buffering=0) as fh:
                try:
                    while True:
                        fh.write(bytes(1 << 16))
                except OSError:
                    pass
        return {}


result = {}
try:
    toy_task.run(str(run), 10, task_class=FillsTheDisk)
except UserError as err:
    result.update(error=str(err), type=type(err).__name__)
result["checkpoints"] = sorted(p.name for p in (run / "checkpoints").iterdir())
result["hidden"] = sorted(str(p) for p in run.rglob(".*"))
(disk / "filler").unlink()
toy_task.run(str(run), 10)
result["latest"] = ckpt.latest_checkpoint(run / "checkpoints").name
result["logged"] = [r["step"] for r in read_metrics(run) if "main/loss" in r]
print(json.dumps(result))
"""


def _tmpfs_command(folder: Path, size: str) -> list[str] | None:
    """`unshare` a user + mount namespace with a `size` tmpfs on `folder` (None where that is not possible)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    command = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} none "$0" && exec "$@"', str(folder)]
    if subprocess.run([*command, "true"], capture_output=True).returncode != 0:
        return None
    return command


def test_a_real_full_disk_while_training_is_one_line_and_the_run_resumes(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    command = _tmpfs_command(disk, "4m")
    if command is None:
        pytest.skip("no unprivileged mount namespaces here (unshare -rm)")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, sys.executable, "-c", _FULL_DISK_SCRIPT, str(disk), str(HERE)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    run = disk / "run"
    assert result.get("type") == "DiskFullError", result
    message = result["error"]
    assert "\n" not in message and "no space left" in message.lower() and str(run) in message
    assert f"{run / 'checkpoints' / 'step_0000005'}" in message and "Free some space" in message
    assert result["checkpoints"] == ["latest", "step_0000005"] and result["hidden"] == []
    assert result["latest"] == "step_0000010" and result["logged"] == [5, 10]
