"""Fault injection: SIGKILL during a checkpoint write, during `tokenizer encode` and during a study stage; a
full disk (ENOSPC) while checkpointing (a generator, a tokenizer), encoding and writing samples; a cache file
cut short. Each leaves the previous state intact and says what happened in one line; re-running the command
finishes."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_faults_support import (AR_TRAIN, TINY_DATA, TINY_TRAIN, TINY_VQ, assert_bit_identical,  # noqa: E402
                                 log_text, make_npz, npz_splits, run, start, token_cache, train_tokenizer)

from twostage import cli  # noqa: E402
from twostage import config as configlib  # noqa: E402
from twostage.common.errors import UserError  # noqa: E402
from twostage.data.cache_writer import write_arrays  # noqa: E402
from twostage.data.token_cache import CacheDataset, TokenCacheError  # noqa: E402
from twostage.engine import checkpoint as ckpt  # noqa: E402
from twostage.generators.ar.config import ARRunConfig  # noqa: E402
from twostage.generators.ar.run import sample_run  # noqa: E402
from twostage.generators.training import train_run  # noqa: E402


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- SIGKILL while a checkpoint is being written ---------------------------------------------------------


def test_sigkill_between_checkpoint_files_keeps_the_previous_one_and_resumes_exactly(tmp_path):
    cache = token_cache(tmp_path / "cache")

    def argv(out):
        return ["generator", "train", "ar_fmnist_tiny", *AR_TRAIN, "--tokens", cache, "--out", out]

    reference = start(argv(tmp_path / "ref"))
    victim_dir = tmp_path / "victim"
    # step 4's model.safetensors and ema.safetensors are written, its optimizer file and state.json not
    assert run(argv(victim_dir), "in_checkpoint:4:2", log=tmp_path / "victim.log") == -signal.SIGKILL
    folder = victim_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step_0000002"]
    partial = list(folder.glob(".tmp-step_0000004-*"))
    assert len(partial) == 1
    assert sorted(p.name for p in partial[0].iterdir()) == ["ema.safetensors", "model.safetensors"]
    latest = ckpt.latest_checkpoint(folder)
    assert latest.name == "step_0000002" and ckpt.load_checkpoint(latest)[0] == 2  # loadable
    out = sample_run(victim_dir, 3, tmp_path / "s.npz", device="cpu", tokens_only=True)  # usable as it is
    assert json.loads(out.with_suffix(".json").read_text())["protocol"]["step"] == 2

    assert run(argv(victim_dir), log=tmp_path / "victim.log") == 0, log_text(tmp_path / "victim.log")
    assert reference.wait(300) == 0
    assert_bit_identical(tmp_path / "ref", victim_dir)
    assert not list(folder.glob(".tmp-*"))  # the next save cleared the partial folder


# -- SIGKILL during `tokenizer encode` ---------------------------------------------------------------------


def test_sigkill_during_encode_leaves_no_cache_and_the_rerun_succeeds(tmp_path):
    make_npz(tmp_path, n=24)
    tok = train_tokenizer("vq", tmp_path / "data.npz", tmp_path / "vq")
    cache = tmp_path / "caches" / "train"
    argv = ["tokenizer", "encode", tok, "--split", "train", "--out", cache, "--batch-size", "4", "--num-workers", "0",
            "--device", "cpu"]
    assert run(argv, "in_encode:2", log=tmp_path / "encode.log") == -signal.SIGKILL  # 2 of 5 batches written
    assert not cache.exists()  # never half-written under its name
    assert len(list(cache.parent.glob(".train.tmp-*"))) == 1  # the killed writer's scratch folder

    assert run(argv, log=tmp_path / "encode.log") == 0, log_text(tmp_path / "encode.log")
    data = CacheDataset(cache)
    assert len(data) == 18 and data.variants == 2
    assert sorted(p.name for p in cache.parent.iterdir()) == ["train"]  # the scratch folder is gone

    # killed while replacing an existing cache (--overwrite): the old one stays whole and usable
    before = _files(cache)
    assert run([*argv, "--overwrite"], "in_encode:1", log=tmp_path / "encode.log") == -signal.SIGKILL
    assert _files(cache) == before and len(CacheDataset(cache)) == 18


# -- SIGKILL during a study stage ---------------------------------------------------------------------------


def tiny_study(data: Path) -> dict:
    """One tiny VQ tokenizer (2 steps) and one tiny AR generator (3 steps) on random 16x16 images."""
    train = ["train.batch_size=4", "train.ckpt_every=1000", "train.log_every=1", "train.num_workers=0",
             "train.device=cpu", "train.progress=false"]
    return {
        "name": "faults",
        "data": {"name": "npz", "root": str(data), "image_size": 16},
        "tokenizer": {"steps": 2, "overrides": [*TINY_VQ, *train], "encode_batch_size": 8, "num_workers": 0},
        "tokenizers": [{"preset": "vq_fmnist_f4"}],
        "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"], "cfg": 2.0,
                              "overrides": [*train, "val.batch_size=4", "sample.grid_at_checkpoint=0"]}},
        "budgets": [3],
        "sample": {"num": 4, "batch_size": 4},
        "eval": {"reference": f"npz:{data}:val", "reference_max_images": 8, "batch_size": 8, "recon_max_images": 4,
                 "recon_perceptual": False},
    }


def test_sigkill_during_a_study_stage_resumes_and_finishes(tmp_path, monkeypatch):
    from twostage.study.table import read_table

    data = npz_splits(tmp_path / "data", train=16, val=8)
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_study(data)))
    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "cache"))  # reference statistics stay in the test
    out, log = tmp_path / "out", tmp_path / "study.log"
    argv = ["study", "run", spec_file, "--out", out]
    # killed inside the generator stage's checkpoint write (step 3; the tokenizer's is step 2), between files
    assert run(argv, "in_checkpoint:3:1", log=log) == -signal.SIGKILL
    assert "generator train" in (out / "commands.log").read_text()
    assert run(argv, log=log) == 0, log_text(log)
    table = read_table(out)
    assert table.num_rows == 1 and table.to_pylist()[0]["train_steps"] == 3
    commands = (out / "commands.log").read_text()
    assert commands.count("tokenizer train") == 1 and commands.count("generator train") == 2  # only it is redone
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob(".*.tmp-*"))


# -- a full disk ---------------------------------------------------------------------------------------------


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cache = token_cache(tmp_path / "cache")
    run_dir = tmp_path / "run"
    cfg = configlib.load(ARRunConfig, "ar_fmnist_tiny", AR_TRAIN)
    real_save = ckpt.save_file
    calls = []

    def save_file(tensors, filename, *a, **k):  # the disk fills up during step 4's checkpoint
        calls.append(filename)
        if "step_0000004" in filename and filename.endswith("ema.safetensors"):
            real_save(dict(list(tensors.items())[:1]), filename)  # a partial file first
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(UserError) as info:
        train_run(cfg, cache, run_dir)
    message = str(info.value)
    assert "no space left" in message and "step_0000002" in message and "re-running the same command" in message
    assert "\n" not in message
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000002"]  # the partial step 4 is gone
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(folder))[0] == 2
    monkeypatch.setattr(ckpt, "save_file", real_save)
    train_run(cfg, cache, run_dir)  # space freed: the same call resumes and finishes
    assert ckpt.latest_checkpoint(folder).name == "step_0000006"
    assert cli.main(["generator", "train", "ar_fmnist_tiny", *AR_TRAIN, "--tokens", str(cache), "--out",
                     str(run_dir)]) == 0


def test_disk_full_while_training_a_tokenizer_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    make_npz(tmp_path)
    out = tmp_path / "vq"
    argv = ["tokenizer", "train", "vq_fmnist_f4", *TINY_DATA, f"data.root={tmp_path / 'data.npz'}", *TINY_VQ,
            *TINY_TRAIN, "monitor.grid_images=0", "train.steps=4", "train.ckpt_every=2", "--out", str(out)]
    real_save = ckpt.save_file

    def save_file(tensors, filename, *a, **k):  # what safetensors raises when the disk is full
        if "step_0000004" in filename:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenizer error: no space left") and "Traceback" not in err[0]
    assert str(out) in err[0] and str(out / "checkpoints" / "step_0000002") in err[0] and "--out" in err[0]
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000002"]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert cli.main(argv) == 0  # space freed: the same command resumes and finishes
    assert ckpt.latest_checkpoint(folder).name == "step_0000004"


def test_disk_full_while_writing_samples_keeps_the_previous_samples(tmp_path, monkeypatch, capsys):
    cache = token_cache(tmp_path / "cache")
    run_dir = tmp_path / "run"
    train_run(configlib.load(ARRunConfig, "ar_fmnist_tiny", [*AR_TRAIN, "train.steps=2"]), cache, run_dir)
    out = tmp_path / "samples" / "s.npz"
    sample_run(run_dir, 3, out, device="cpu", tokens_only=True)
    before = _files(out.parent)
    real_savez = np.savez

    def savez(file, **arrays):  # a partial file, then the disk is full
        Path(file).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(np, "savez", savez)
    assert cli.main(["generator", "sample", str(run_dir), "--num", "5", "--out", str(out), "--device", "cpu",
                     "--tokens-only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(out) in err[0] and "unchanged" in err[0]
    assert _files(out.parent) == before  # the old samples file and its record, and no partial file
    monkeypatch.setattr(np, "savez", real_savez)
    with np.load(out) as z:
        assert len(z["arr_1"]) == 3


def test_disk_full_while_encoding_keeps_the_old_cache(tmp_path, monkeypatch):
    cache = token_cache(tmp_path / "cache")
    before = _files(cache)
    meta = CacheDataset(cache).meta
    codes = np.zeros((30, 2, 9), np.uint16)
    for target, name in ((np, "save"), (os, "posix_fallocate")):
        with monkeypatch.context() as m:
            m.setattr(target, name, _disk_full)
            with pytest.raises(TokenCacheError, match=r"no space left on the device of .*cache.*the cache already "
                                                      r"there is unchanged.*Free about"):
                write_arrays(cache, meta, codes, np.zeros(30, np.int64), overwrite=True)
        assert _files(cache) == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert len(CacheDataset(cache)) == 24


# -- a cache file cut short -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokens.npy", "labels.npy", "meta.json"])
def test_truncated_cache_file_is_a_clear_error(tmp_path, name, capsys):
    cache = token_cache(tmp_path / "cache")
    meta = json.loads((cache / "meta.json").read_text())
    meta.update(tokenizer_run="/runs/vq", split="train")
    (cache / "meta.json").write_text(json.dumps(meta))
    path = cache / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TokenCacheError) as info:
        CacheDataset(cache)
    message = str(info.value)
    assert str(path) in message and "re-encode" in message and "twostage tokenizer encode" in message
    if name != "meta.json":
        assert "--split train" in message and "/runs/vq" in message and "--overwrite" in message
    # through the CLI: one line, no traceback
    assert cli.main(["generator", "train", "ar_fmnist_tiny", *AR_TRAIN, "--tokens", str(cache), "--out",
                     str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "Traceback" not in err[0]
