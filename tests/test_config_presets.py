"""Presets: `base:` inheritance, and the presets shipping inside a regular (non-editable) install."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from twostage.config import ConfigError, load, read_source
from twostage.generators.ar.config import ARRunConfig
from twostage.tokenizers.vq.config import VQRunConfig

REPO = Path(__file__).resolve().parents[1]


def test_base_chain_merges_nearest_last_and_a_loop_is_an_error(tmp_path):
    mid = tmp_path / "mid.yaml"
    mid.write_text("base: vq_fmnist_f4\nmodel:\n  codebook_size: 256\ntrain:\n  steps: 5\n")
    top = tmp_path / "top.yaml"
    top.write_text(f"base: {mid}\ntrain:\n  steps: 7\n")
    assert "base" not in read_source(top)
    assert load(VQRunConfig, top) == load(VQRunConfig, "vq_fmnist_f4", ["model.codebook_size=256", "train.steps=7"])

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match="loops"):
        read_source(a)
    a.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match="loops"):
        read_source(a)


@pytest.mark.parametrize(
    "cls, preset, base, overrides",
    [
        (VQRunConfig, "vq_fmnist_f2", "vq_fmnist_f4", ["model.channel_mult=[1, 2]"]),
        (VQRunConfig, "vq_fmnist_f8", "vq_fmnist_f4", ["model.channel_mult=[1, 2, 2, 4]"]),
        (VQRunConfig, "vq_fmnist_f4_crt", "vq_fmnist_f4", ["crt.enabled=true", "model.entropy_weight=0.1"]),
        (
            ARRunConfig,
            "ar_fmnist_small",
            "ar_fmnist_tiny",
            ["model.size=small", "model.ffn_multiple_of=64", "optim.lr=5.0e-4", "optim.warmup_steps=500",
             "val.max_samples=5000", "train.steps=20000", "train.ckpt_every=2000"],
        ),
    ],
)
def test_near_copy_presets_are_their_base_plus_the_differences(cls, preset, base, overrides):
    assert load(cls, preset) == load(cls, base, overrides)


def test_a_regular_install_ships_the_presets(tmp_path):
    # Build from a copy, so that setuptools' build/ and *.egg-info land in tmp_path, not in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "twostage", src / "twostage", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # vq_fmnist_f2 names vq_fmnist_f4 as its base, so reading it resolves a base inside the install too.
    probe = ("from twostage.config import read_source, resolve_preset; "
             "read_source('vq_fmnist_f2'); print(resolve_preset('vq_fmnist_f4'))")
    found = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == target / "twostage" / "presets" / "vq_fmnist_f4.yaml"
