"""train.deterministic (twostage/engine/determinism.py): deterministic kernels inside the training loop
only, the process's own settings before and after; a changed flag resumes (it does not change the run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from toy_task import ToyImages, ToyTask  # noqa: E402

from twostage.engine.config import TrainConfig  # noqa: E402
from twostage.engine.resume_changes import change_kind  # noqa: E402
from twostage.engine.trainer import seed_everything, train  # noqa: E402


class RecordingTask(ToyTask):
    """Records, at every step, whether deterministic algorithms were on and cuDNN autotuning off."""

    def __init__(self):
        super().__init__(critic=False)
        self.seen: list[tuple[bool, bool, str | None]] = []

    def main_loss(self, ctx):
        self.seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                          os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return super().main_loss(ctx)


def _train(tmp_path: Path, name: str, deterministic: bool, steps: int = 3,
           cudnn_benchmark: bool | None = None) -> RecordingTask:
    seed_everything(0)
    task = RecordingTask()
    cfg = TrainConfig(steps=steps, batch_size=8, log_every=3, ckpt_every=3, num_workers=0, progress=False,
                      device="cpu", deterministic=deterministic, cudnn_benchmark=cudnn_benchmark)
    train(task, cfg, ToyImages(), tmp_path / name)
    return task


def test_deterministic_kernels_only_inside_the_loop(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    try:
        on = _train(tmp_path, "on", True)
        assert on.seen and all(s == (True, False, ":4096:8") for s in on.seen)
        # back to what the process had
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        off = _train(tmp_path, "off", False)
        assert all(s == (False, True, None) for s in off.seen)
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = False


def test_cudnn_autotuning_is_on_in_the_loop_unless_deterministic_or_turned_off(tmp_path):
    import pytest

    from twostage.config import ConfigError

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        assert all(benchmark for _, benchmark, _ in _train(tmp_path, "auto", False).seen)  # default: autotune
        assert not torch.backends.cudnn.benchmark  # the process's setting back after the loop
        assert not any(benchmark for _, benchmark, _ in _train(tmp_path, "off", False, cudnn_benchmark=False).seen)
        assert not any(benchmark for _, benchmark, _ in _train(tmp_path, "det", True).seen)
    finally:
        torch.backends.cudnn.benchmark = previous
    with pytest.raises(ConfigError, match="cudnn_benchmark=true with train.deterministic=true"):
        TrainConfig(deterministic=True, cudnn_benchmark=True).check()
    assert change_kind("train.cudnn_benchmark", None, False) == "free"  # resumable: kernels, not the run


def test_two_deterministic_runs_are_bit_identical_and_the_flag_resumes(tmp_path):
    from twostage.engine.run_files import load_run_weights

    _train(tmp_path, "a", True), _train(tmp_path, "b", True)
    wa, wb = (load_run_weights(tmp_path / n, "net", weights="raw").state for n in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert change_kind("train.deterministic", False, True) == "free"
    _train(tmp_path, "a", False, steps=6)  # resumed from step 3 with the flag off
    assert load_run_weights(tmp_path / "a", "net", weights="raw").step == 6


def test_compile_mode_needs_compile_and_reaches_torch_compile():
    import pytest

    from twostage.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile_mode=reduce-overhead takes effect only with train.compile=true"):
        TrainConfig(compile_mode="reduce-overhead").check()
    graphs = TrainConfig(compile=True, compile_mode="reduce-overhead")
    assert graphs.compile_options == {"mode": "reduce-overhead"} and graphs.cuda_graphs
    plain = TrainConfig(compile=True)
    assert plain.compile_options == {} and not plain.cuda_graphs
    assert not TrainConfig(compile=True, compile_mode="max-autotune-no-cudagraphs").cuda_graphs
    assert change_kind("train.compile_mode", "default", "reduce-overhead") == "free"
