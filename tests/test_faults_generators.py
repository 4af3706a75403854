"""Generator faults a new user hits: resuming on another tokenizer's cache, run records rewritten by a resume
that is then refused (also after a run killed before its first checkpoint), no progress shown while sampling
on a CPU, and `--num 0` writing an empty file."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_faults_support import AR_TRAIN, token_cache  # noqa: E402

from twostage import cli  # noqa: E402
from twostage.data.cache_writer import write_arrays  # noqa: E402
from twostage.data.token_cache import CacheMeta  # noqa: E402

SUM_A, SUM_B = "a" * 64, "b" * 64
DIT_TRAIN = ["model.size=tiny", "train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1",
             "train.num_workers=0", "train.device=cpu", "train.progress=false", "val.batch_size=2",
             "sample.grid_at_checkpoint=0", "sample.steps=2"]


def latent_cache(folder: Path, checksum: str = SUM_A, n: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(n, 2, 4, 2, 2)).astype(np.float32)
    meta = CacheMeta(kind="latents", grid=(2, 2), num_classes=3, tokenizer_run="", tokenizer_checksum=checksum,
                     split="train", channels=4, image_size=8)
    return write_arrays(folder, meta, latents, np.arange(n) % 3)


def train_cli(preset: str, overrides: list[str], cache: Path, out: Path) -> int:
    return cli.main(["generator", "train", preset, *overrides, "--tokens", str(cache), "--out", str(out)])


KINDS = {
    "ar": ("ar_fmnist_tiny", [*AR_TRAIN, "train.steps=2"], token_cache),
    "dit": ("dit_fmnist", DIT_TRAIN, latent_cache),
}


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tmp_path_factory):
    """(kind, preset, overrides, a run trained 2 steps on a cache of tokenizer SUM_A, that cache, folder)."""
    kind = request.param
    preset, overrides, make = KINDS[kind]
    tmp = tmp_path_factory.mktemp(kind)
    cache = make(tmp / "cache_a", checksum=SUM_A)
    assert train_cli(preset, overrides, cache, tmp / "run") == 0
    return kind, preset, overrides, tmp / "run", cache, tmp


def _records(run: Path) -> dict[str, tuple]:
    """Every file and folder of a run folder (the folder too, TensorBoard's event files too): its mtime and,
    for a file, its bytes. A refused attempt must leave all of them as they were."""
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted([run, *run.rglob("*")])}


# -- provenance ----------------------------------------------------------------------------------------------


def test_resuming_on_another_tokenizers_cache_is_refused_naming_both(trained, capsys):
    kind, preset, overrides, run, _, tmp = trained
    other = KINDS[kind][2](tmp / "cache_b", checksum=SUM_B)  # same grid and codebook / channels, another tokenizer
    before = _records(run)
    capsys.readouterr()
    assert train_cli(preset, [*overrides, "train.steps=4"], other, run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error:")
    assert SUM_A in err[0] and SUM_B in err[0] and str(other) in err[0]
    assert _records(run) == before  # model.json, config.yaml, run.json, checkpoints: all as they were


def test_a_refused_resume_rewrites_no_run_record(trained, capsys):
    kind, preset, overrides, run, cache, tmp = trained
    before = _records(run)
    # the engine refuses a changed batch size; model.json (whose FLOPs per step depend on it) stays
    assert train_cli(preset, [*overrides, "train.batch_size=2", "train.steps=4"], cache, run) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert _records(run) == before
    # as does a resume on other data of the same tokenizer (another split or --limit)
    fewer = KINDS[kind][2](tmp / "cache_fewer", checksum=SUM_A, n=8)
    assert train_cli(preset, [*overrides, "train.steps=4"], fewer, run) == 2
    err = capsys.readouterr().err
    assert "holds 8 images" in err and str(fewer) in err and _records(run) == before


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_run_killed_before_its_first_checkpoint_keeps_its_records_when_a_retry_is_refused(kind, tmp_path,
                                                                                             monkeypatch, capsys):
    from twostage.data.loader import ResumableLoader

    preset, overrides, make = KINDS[kind]
    cache, run = make(tmp_path / "cache", checksum=SUM_A), tmp_path / "run"

    def killed(self):  # the process dies in its first step, before any checkpoint
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(ResumableLoader, "__next__", killed)
        with pytest.raises(_Killed):
            train_cli(preset, overrides, cache, run)
    assert (run / "model.json").is_file() and (run / "config.yaml").is_file()
    assert not list(run.glob("checkpoints/step_*"))
    before = _records(run)
    # retried with a batch size the engine refuses (model.json's FLOPs per step depend on it)
    assert train_cli(preset, [*overrides, "train.batch_size=2", "train.steps=4"], cache, run) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert _records(run) == before
    # the same command runs: it starts the run over and records it
    assert train_cli(preset, overrides, cache, run) == 0
    info = json.loads((run / "model.json").read_text())
    assert info["kind"] == kind and info["train_cache"] == str(cache.resolve())
    assert (run / "checkpoints" / "step_0000002").is_dir()


def test_a_moved_cache_of_the_same_tokenizer_resumes_and_is_recorded(trained, tmp_path):
    kind, preset, overrides, run, cache, _ = trained
    run_copy, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(run, run_copy)
    shutil.copytree(cache, moved)
    assert train_cli(preset, [*overrides, "train.steps=4"], moved, run_copy) == 0
    info = json.loads((run_copy / "model.json").read_text())
    assert info["train_cache"] == str(moved.resolve()) and info["tokenizer_checksum"] == SUM_A
    assert (run_copy / "checkpoints" / "step_0000004").is_dir()


# -- sampling: --num, progress ------------------------------------------------------------------------------


class StandIn:
    """A decoder standing in for the cache's tokenizer: flat gray images of the right count."""

    checksum = SUM_A

    def decode(self, codes):
        return torch.zeros(codes.shape[0], 3, 8, 8)


@pytest.mark.parametrize("num", ["0", "-3"])
def test_sample_num_must_be_positive(trained, tmp_path, num, monkeypatch, capsys):
    _, _, _, run, _, _ = trained
    monkeypatch.setattr("twostage.tokenizers.base.load_tokenizer", lambda *a, **k: StandIn())
    out = tmp_path / "s.npz"
    assert cli.main(["generator", "sample", str(run), "--num", num, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"num={num} (--num): the number of samples must be a positive integer" in err
    assert not list(tmp_path.iterdir())  # no empty samples file


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sampling_shows_a_progress_bar_with_a_rate_on_a_terminal(trained, tmp_path, monkeypatch, capsys):
    kind, _, _, run, _, _ = trained
    monkeypatch.setattr("twostage.tokenizers.base.load_tokenizer", lambda *a, **k: StandIn())
    terminal = TTY()
    monkeypatch.setattr(sys, "stderr", terminal)
    cli.main(["generator", "sample", str(run), "--num", "7", "--batch-size", "3", "--out", str(tmp_path / "s.npz"),
              "--device", "cpu", "--grid", "0", *(["--tokens-only"] if kind == "ar" else ["--steps", "1"])])
    shown = terminal.getvalue()
    assert f"sampling {kind}" in shown and "7/7" in shown and "img/s" in shown
    monkeypatch.undo()
    # not a terminal (logs, CI, tests): no bar
    monkeypatch.setattr("twostage.tokenizers.base.load_tokenizer", lambda *a, **k: StandIn())
    capsys.readouterr()
    from twostage import api

    options = {"tokens_only": True} if kind == "ar" else {"steps": 1}
    api.sample(run, 4, tmp_path / "t.npz", device="cpu", batch_size=3, grid=0, **options)
    assert "img/s" not in capsys.readouterr().err
    with np.load(tmp_path / "t.npz") as z:
        assert len(z["arr_1"]) == 4
