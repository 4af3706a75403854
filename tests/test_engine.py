"""The shared training engine: exact resume, data parallel equivalence, non-finite stop, schedules."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from twostage.config import ConfigError
from twostage.engine import checkpoint as ckpt
from twostage.engine.ema import EMA
from twostage.engine.optim import lr_factor
from twostage.engine.task import OptimConfig
from twostage.engine.trainer import NonFiniteLossError
from twostage.engine.run_log import read_metrics

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import toy_task  # noqa: E402


def _final_weights(run_dir: Path) -> tuple[dict, dict]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return load_file(path / "model.safetensors"), load_file(path / "ema.safetensors")


def _script(run_dir: Path, steps: int, accum: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([sys.executable, str(HERE / "toy_task.py"), str(run_dir), str(steps), str(accum)], env=env)


def test_sigkill_and_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    steps = 400
    reference = _script(tmp_path / "ref", steps, accum=2)
    victim = _script(tmp_path / "victim", steps, accum=2)
    latest = tmp_path / "victim" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = ckpt.latest_checkpoint(latest.parent)
    assert killed_at is not None and killed_at.name != f"step_{steps:07d}", "the run finished before the kill"
    resumed = _script(tmp_path / "victim", steps, accum=2)
    assert resumed.wait() == 0 and reference.wait() == 0
    model_a, ema_a = _final_weights(tmp_path / "ref")
    model_b, ema_b = _final_weights(tmp_path / "victim")
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    # the metrics file tells one continuous history, without the steps that were redone
    steps_logged = [r["step"] for r in read_metrics(tmp_path / "victim") if "main/loss" in r]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps


def test_resume_refuses_a_changed_config(tmp_path):
    toy_task.run(str(tmp_path), 5)
    with pytest.raises(ConfigError, match="different config"):
        toy_task.run(str(tmp_path), 10, grad_accum=2)
    toy_task.run(str(tmp_path), 10)  # more steps is a resumable change


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    no_dropout = {"dropout": 0.0}
    toy_task.run(str(tmp_path / "a"), 6, task=no_dropout)
    toy_task.run(str(tmp_path / "b"), 6, task=no_dropout, grad_accum=4)
    a, _ = _final_weights(tmp_path / "a")
    b, _ = _final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    toy_task.run(run_dir, 6, task={"dropout": 0.0})
    torch.distributed.destroy_process_group()


def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    toy_task.run(str(tmp_path / "single"), 6, task={"dropout": 0.0})
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    a, ema_a = _final_weights(tmp_path / "single")
    b, ema_b = _final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=1e-5, atol=1e-6)


class _ExplodingTask(toy_task.ToyTask):
    def main_loss(self, ctx):
        loss, logs = super().main_loss(ctx)
        return (loss * float("nan") if ctx.step >= 7 else loss), logs


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_task, "ToyTask", _ExplodingTask)
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(NaN/inf\) at step 7.*step_0000005"):
        toy_task.run(str(tmp_path), 20)
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_0000005"
    model, _ = _final_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in model.values())


def test_run_folder_contents(tmp_path):
    last = toy_task.run(str(tmp_path), 10)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "run.json").is_file()
    assert any((tmp_path / "tb").iterdir())
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10]
    assert {"main/loss", "main/ce", "critic/loss", "net/grad_norm", "lr/net", "perf/images_per_s"} <= set(records[-1])
    assert last["main/ce"] == records[-1]["main/ce"]


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(50, OptimConfig(schedule="constant"), 110) == 1.0


def test_ema_follows_the_recurrence():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA({"net": net}, decay=0.9)
    expected = 0.0
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    assert ema.modules["net"].weight[0, 0].item() == pytest.approx(expected)
    assert not any(p.requires_grad for p in ema.modules["net"].parameters())
    assert math.isclose(expected, 0.561)
