"""Exact resume with real components: a run SIGKILLed after a checkpoint and re-run with the same command
ends bit-identical (model, EMA, optimizers, schedules, RNG and loader states) to an uninterrupted run.

The side work at checkpoints is real here: the AR and DiT runs draw their sample grids with the real
tokenizer that made their cache, loaded lazily at the first checkpoint (building it draws from the
global RNG unless the engine isolates it), and the VQ run trains with its PatchGAN starting after the
kill and the CRT predictor on (dropout, class-free predictor, three optimizers).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from twostage.engine.run_log import read_metrics

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_faults_support import (TINY_DATA, TINY_TRAIN, TINY_VQ, assert_bit_identical, encode,  # noqa: E402
                                 final_checkpoint, log_text, make_npz, start, train_tokenizer)

GEN_TRAIN = ["train.steps=6", "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0", "train.device=cpu",
             "train.progress=false", "train.ema_decay=0.9", "sample.grid_at_checkpoint=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    make_npz(folder)
    return folder


def _kill_and_resume(tmp_path: Path, argv, kill_after: int) -> int:
    """Run `argv(out)` uninterrupted into ref/ and, at the same time, into victim/ with a SIGKILL right
    after checkpoint `kill_after` (and its side work); re-run the victim's command; compare."""
    ref_dir, victim_dir = tmp_path / "ref", tmp_path / "victim"
    ref_log, victim_log = tmp_path / "ref.log", tmp_path / "victim.log"
    reference = start(argv(ref_dir), log=ref_log)
    victim = start(argv(victim_dir), f"after_checkpoint:{kill_after}", log=victim_log)
    assert victim.wait(300) == -signal.SIGKILL, log_text(victim_log)
    checkpoints = sorted(p.name for p in (victim_dir / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == f"step_{kill_after:07d}", checkpoints  # killed after it, before the next one
    resumed = start(argv(victim_dir), log=victim_log)
    assert resumed.wait(300) == 0, log_text(victim_log)
    assert reference.wait(300) == 0, log_text(ref_log)
    assert f"resumed from {victim_dir / 'checkpoints' / f'step_{kill_after:07d}'}" in log_text(victim_log)
    return assert_bit_identical(ref_dir, victim_dir)


def test_ar_with_a_real_vq_grid_decoder_resumes_bit_identical(root, tmp_path):
    run = train_tokenizer("vq", root / "data.npz", root / "vq")
    train, val = encode(run, "train", root / "vq_train"), encode(run, "val", root / "vq_val", flip=False)

    def argv(out):
        return ["generator", "train", "ar_fmnist_tiny", "train.batch_size=8", "val.batch_size=4", *GEN_TRAIN,
                "--tokens", train, "--val-tokens", val, "--out", out]

    assert _kill_and_resume(tmp_path, argv, kill_after=2) > 20
    for step in (2, 4, 6):  # the grids were drawn: the real decoder was loaded in both runs
        assert (tmp_path / "ref" / "samples" / f"step_{step:07d}.png").is_file()
        assert (tmp_path / "victim" / "samples" / f"step_{step:07d}.png").is_file()


def test_dit_with_a_real_kl_grid_decoder_resumes_bit_identical(root, tmp_path):
    run = train_tokenizer("kl", root / "data.npz", root / "kl")
    train, val = encode(run, "train", root / "kl_train"), encode(run, "val", root / "kl_val", flip=False)

    def argv(out):
        return ["generator", "train", "dit_fmnist", "model.size=tiny", "train.batch_size=4", "val.batch_size=2",
                "sample.grid_steps=2", *GEN_TRAIN, "--tokens", train, "--val-tokens", val, "--out", out]

    assert _kill_and_resume(tmp_path, argv, kill_after=2) > 20
    for step in (2, 4, 6):
        assert (tmp_path / "victim" / "samples" / f"step_{step:07d}.png").is_file()


def test_vq_tokenizer_with_gan_and_crt_resumes_bit_identical(root, tmp_path):
    # the discriminator starts at step 3, after the kill at step 2: the resumed run crosses the GAN start
    def argv(out):
        return ["tokenizer", "train", "vq_fmnist_f4", *TINY_DATA, f"data.root={root / 'data.npz'}", *TINY_VQ,
                *TINY_TRAIN, "train.steps=6", "train.ckpt_every=2", "train.ema_decay=0.9", "loss.gan_weight=0.5",
                "loss.disc_start=3", "loss.adaptive_gan_weight=true", "crt.enabled=true", "crt.width=32",
                "crt.heads=2", "crt.dropout=0.1", "--out", out]

    assert _kill_and_resume(tmp_path, argv, kill_after=2) > 50
    final = final_checkpoint(tmp_path / "victim")
    assert {k.split(".")[0] for k in final["model.safetensors"]} == {"tokenizer", "crt", "disc"}
    logged = {r["step"]: r for r in read_metrics(tmp_path / "victim") if "autoencoder/loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]  # one history, the redone steps not repeated
    assert "discriminator/d" in logged[4] and "autoencoder/gan_g" in logged[4] and "autoencoder/crt" in logged[4]
