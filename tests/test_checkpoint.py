"""Atomic checkpoints: a crash while writing leaves the previous checkpoint loadable."""

import numpy as np
import pytest
import torch

from twostage.engine import checkpoint as ckpt


def _state(value: float):
    opt_like = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), value)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]}
    return {"opt": opt_like, "rng": {"numpy": np.random.get_state(legacy=False)}, "loader": {"epoch": 1}}


def test_roundtrip_restores_nested_state(tmp_path):
    model = {"net.w": torch.randn(3, 3)}
    ckpt.save_checkpoint(tmp_path, 10, model, _state(1.0))
    step, m, s, ema = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert step == 10 and ema is None
    assert torch.equal(m["net.w"], model["net.w"])
    assert s["opt"]["state"][0]["exp_avg"].tolist() == [1.0, 1.0]
    assert s["opt"]["param_groups"][0]["betas"] == (0.9, 0.95)
    np.random.set_state(s["rng"]["numpy"])  # accepted as a real numpy state


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, _state(1.0))
    real_save = ckpt.save_file

    def crashing_save(tensors, filename):
        real_save(tensors, filename)
        with open(filename, "r+b") as fh:  # leave a half-written file behind, then die
            fh.truncate(10)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, _state(2.0))
    monkeypatch.setattr(ckpt, "save_file", real_save)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_0000001"
    step, model, _, _ = ckpt.load_checkpoint(latest)
    assert step == 1 and model["w"].tolist() == [1.0, 1.0]
    # the next save cleans the debris and succeeds
    ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, _state(2.0))
    assert not list(tmp_path.glob(".tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000002"


def test_keeps_only_the_newest(tmp_path):
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.ones(1) * step}, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_tied_weights_are_saved(tmp_path):
    lin = torch.nn.Linear(4, 4, bias=False)
    emb = torch.nn.Embedding(4, 4)
    emb.weight = lin.weight  # tied
    net = torch.nn.ModuleDict({"lin": lin, "emb": emb})
    tensors = ckpt.module_tensors({"net": net})
    ckpt.save_checkpoint(tmp_path, 1, tensors, {})
    _, loaded, _, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(loaded["net.lin.weight"], loaded["net.emb.weight"])


def test_unreadable_checkpoint_error_says_what_to_do(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="Delete that folder"):
        ckpt.load_checkpoint(path)


def test_last_finite_checkpoint_skips_ones_with_nan_weights(tmp_path):
    # A -inf attention-mask buffer is fine: only the given (parameter) keys are checked.
    mask = torch.full((2, 2), float("-inf"))
    ckpt.save_checkpoint(tmp_path, 1, {"net.w": torch.ones(2), "net.mask": mask}, {},
                         ema={"net.w": torch.ones(2)}, keep=5)
    ckpt.save_checkpoint(tmp_path, 2, {"net.w": torch.ones(2), "net.mask": mask}, {},
                         ema={"net.w": torch.tensor([1.0, float("nan")])}, keep=5)
    ckpt.save_checkpoint(tmp_path, 3, {"net.w": torch.tensor([float("inf"), 0.0]), "net.mask": mask}, {},
                         ema={"net.w": torch.ones(2)}, keep=5)
    keys = {"net.w"}
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000003"
    good, bad = ckpt.last_finite_checkpoint(tmp_path, model_keys=keys, ema_keys=keys)
    assert good.name == "step_0000001" and [p.name for p in bad] == ["step_0000002", "step_0000003"]
    assert not ckpt.has_finite_weights(good)  # without keys the -inf buffer counts
    (good / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.last_finite_checkpoint(tmp_path, keys, keys) == (None, [good, *bad])


ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


@pytest.mark.parametrize("fails", ["model.safetensors", "ema.safetensors", "optim.safetensors"])
def test_a_failed_write_removes_its_temporary_folder(tmp_path, monkeypatch, fails):
    import errno

    from safetensors import SafetensorError

    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, _state(1.0), ema={"w": torch.ones(2)})
    real_save = ckpt.save_file

    def full_disk(tensors, filename, *a, **k):
        if filename.endswith(fails):
            with open(filename, "wb") as fh:
                fh.write(b"half a file")
            raise SafetensorError(ENOSPC_MESSAGE)
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError) as info:  # safetensors' I/O error becomes the OSError it is
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, _state(2.0), ema={"w": torch.zeros(2)})
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith(fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]  # nothing left behind
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))[0] == 1


def test_a_safetensors_error_that_is_not_an_io_error_stays_what_it_is(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def broken(tensors, filename, *a, **k):
        raise SafetensorError("some other problem")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(SafetensorError, match="some other problem"):
        ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_write_text_atomic_removes_its_temporary_file_on_failure(tmp_path, monkeypatch, step):
    import errno
    import os

    target = tmp_path / "run.json"
    target.write_text("old")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, step, full_disk)  # the text is written, then flushing / renaming it fails
    with pytest.raises(OSError):
        ckpt.write_text_atomic(target, "new text")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"] and target.read_text() == "old"
