"""SIGTERM / SIGUSR1 during training (twostage/engine/preemption.py, trainer.py): the run finishes its
step, checkpoints it without the side work, exits with 128 + the signal number, and the same command
resumes it exactly.

The signal is real (os.kill of this process while a step is computed), so the handlers are the trainer's; a
test handler stands in for the caller's, fails the test if a signal reaches it and must be back afterwards.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import toy_task  # noqa: E402
from test_engine import _free_port  # noqa: E402
from test_faults_support import assert_bit_identical, final_checkpoint, token_cache  # noqa: E402
from test_replicas import TRAIN as REPLICA_TRAIN  # noqa: E402

from twostage.engine import preemption, trainer  # noqa: E402
from twostage.study.runner import StageError, invoke  # noqa: E402


@pytest.fixture
def outer_handler():
    """The caller's handler of SIGTERM and SIGUSR1 while the test runs."""
    def outer(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the caller's handler, not the trainer's")

    previous = {s: signal.signal(s, outer) for s in preemption.STOP_SIGNALS}
    yield outer
    for s, handler in previous.items():
        signal.signal(s, handler)


def _signal_during(step: int, signum: int = signal.SIGTERM, workers: bool = False):
    """A `_Trainer._run_phase` that sends `signum` to this process when step `step` starts its first phase (the
    trainer has to finish that step). `workers`: to its DataLoader workers as well, first and from another
    process, as SLURM and `timeout` signal the whole process group (torch's workers exit quietly only when
    their parent signals them)."""
    run_phase = trainer._Trainer._run_phase

    def phase(self, this, *args):
        if self.step == step - 1 and this is self.phases[0]:
            if workers:
                children = [str(c.pid) for c in multiprocessing.active_children()]
                assert children, "the loader has no worker processes"
                subprocess.run(["kill", f"-{int(signum)}", *children], check=True)
            os.kill(os.getpid(), signum)
        return run_phase(self, this, *args)

    return phase


def _signal(monkeypatch, *args, **kwargs) -> None:
    monkeypatch.setattr(trainer._Trainer, "_run_phase", _signal_during(*args, **kwargs))


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_the_step_exits_and_resumes_exactly(tmp_path, monkeypatch, caplog, outer_handler, signum):
    side_work: list[int] = []
    monkeypatch.setattr(toy_task.ToyTask, "on_checkpoint", lambda self, step, run_dir, models: side_work.append(step))
    toy_task.run(str(tmp_path / "ref"), 12)  # checkpoints every 5 steps
    side_work.clear()
    _signal(monkeypatch, 7, signum)
    with caplog.at_level(logging.WARNING, logger=trainer.__name__), pytest.raises(SystemExit) as stopped:
        toy_task.run(str(tmp_path / "victim"), 12)
    assert stopped.value.code == 128 + signum  # 143 for SIGTERM, what a shell reports for a terminated process
    assert _checkpoints(tmp_path / "victim") == ["step_0000005", "step_0000007"]
    assert side_work == [5]  # no validation / previews for the stop's checkpoint
    assert (f"{signal.Signals(signum).name}: training stopped at step 7 with a checkpoint there; re-running the "
            "same command resumes from it") in caplog.text
    assert signal.getsignal(signum) is outer_handler

    toy_task.run(str(tmp_path / "victim"), 12)
    assert side_work == [5, 10, 12]  # resumed from step 7, not from 5
    # model, EMA, optimizer moments, schedules, RNG and loader states: equal bit for bit
    assert assert_bit_identical(tmp_path / "ref", tmp_path / "victim") > 0


def test_handlers_are_set_for_training_only(tmp_path, monkeypatch, outer_handler):
    during: list[object] = []
    monkeypatch.setattr(toy_task.ToyTask, "on_checkpoint",
                        lambda self, step, run_dir, models: during.append(signal.getsignal(signal.SIGTERM)))
    toy_task.run(str(tmp_path / "a"), 3, ckpt_every=3)
    assert len(during) == 1 and during[0] is not outer_handler
    assert all(signal.getsignal(s) is outer_handler for s in preemption.STOP_SIGNALS)
    # Outside the main thread Python sets no signal handlers: the run trains without them.
    errors: list[BaseException] = []

    def in_thread():
        try:
            toy_task.run(str(tmp_path / "b"), 3, ckpt_every=3)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert not errors and _checkpoints(tmp_path / "b") == ["step_0000003"]


def test_signal_to_the_process_group_spares_the_loader_workers(tmp_path, monkeypatch, outer_handler):
    _signal(monkeypatch, 3, workers=True)
    with pytest.raises(SystemExit) as stopped:
        toy_task.run(str(tmp_path), 6, num_workers=1)
    assert stopped.value.code == 143 and _checkpoints(tmp_path) == ["step_0000003"]
    assert not multiprocessing.active_children()  # closed as usual


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 1:  # only one rank gets the signal
        trainer._Trainer._run_phase = _signal_during(3)
    try:
        toy_task.run(run_dir, 10, log_every=2)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_stop_together_at_the_next_log_step(tmp_path):
    """DDP: rank 1's request reaches rank 0 through the all-reduce of the logs at step 4 (log_every=2): both
    ranks stop there with one checkpoint (none waits in a collective), and both exit 143."""
    ranks = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
                               join=False)
    for process in ranks.processes:
        process.join(60)
        if process.is_alive():  # left waiting in a collective: the failure this test is about
            process.kill()
    assert [p.exitcode for p in ranks.processes] == [143, 143]
    assert _checkpoints(tmp_path) == ["step_0000004"]


def test_stopped_replicas_are_a_failed_stage_that_resumes(tmp_path, monkeypatch, caplog, outer_handler):
    """Through the study's stage runner: the exit code fails the stage (no done marker, the job is not done),
    and the same stage run again resumes the joint run from the stop's checkpoint."""
    caches = [token_cache(tmp_path / "a", seed=1, checksum="a"), token_cache(tmp_path / "b", seed=2, checksum="b")]

    def argv(name: str) -> list[str]:  # checkpoints at steps 3 and 6
        outs = [str(tmp_path / f"{name}{k}") for k in range(2)]
        return ["generator", "train", "ar_fmnist_tiny", *REPLICA_TRAIN, "model.resid_dropout=0.2", "--tokens",
                *map(str, caches), "--val-tokens", *map(str, caches), "--out", *outs, "--seeds", "0", "1",
                "--pack", str(tmp_path / name)]

    invoke(argv("ref"), tmp_path)
    _signal(monkeypatch, 2)
    with pytest.raises(StageError, match="exit code 143"):
        invoke(argv("victim"), tmp_path)
    assert _checkpoints(tmp_path / "victim") == ["step_0000002"]  # the joint run's stacked checkpoint
    for k in range(2):  # the replicas' own checkpoints and validation are side work: not written for the stop
        assert not _checkpoints(tmp_path / f"victim{k}")
        assert not (tmp_path / f"victim{k}" / "val" / "step_0000002.json").exists()
    with caplog.at_level(logging.INFO, logger=trainer.__name__):
        invoke(argv("victim"), tmp_path)
    assert f"resumed from {tmp_path / 'victim' / 'checkpoints' / 'step_0000002'}" in caplog.text
    assert assert_bit_identical(tmp_path / "ref", tmp_path / "victim") > 0
    for k in range(2):
        ref, victim = final_checkpoint(tmp_path / f"ref{k}"), final_checkpoint(tmp_path / f"victim{k}")
        assert ref["name"] == victim["name"] == "step_0000006"
        assert (tmp_path / f"victim{k}" / "val" / "step_0000006.json").is_file()
        for name in ("model.safetensors", "ema.safetensors"):
            for key, value in ref[name].items():
                torch.testing.assert_close(victim[name][key], value, rtol=0, atol=0)
