"""`tokenizer encode` shows a progress bar with images/s (issue "Faults a new user hits", item 6)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from twostage import cli
from twostage.tokenizers.run import encode_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A VQ tokenizer trained for 2 steps on 24 random 16x16 images (about a second on CPU)."""
    tmp = tmp_path_factory.mktemp("enc")
    images = np.random.default_rng(0).integers(0, 256, size=(24, 16, 16), dtype=np.uint8)
    np.savez(tmp / "data.npz", images=images, labels=np.arange(24) % 3)
    cfg = {
        "data": {"name": "npz", "root": str(tmp / "data.npz"), "image_size": 16},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "enc_res_blocks": 1, "dec_res_blocks": 1,
                  "z_channels": 4, "norm_groups": 4, "codebook_size": 16, "code_dim": 4},
        "loss": {"perceptual": "none", "gan_weight": 0},
        "monitor": {"grid_images": 0},
        "train": {"steps": 2, "batch_size": 4, "num_workers": 0, "device": "cpu", "progress": False},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["tokenizer", "train", str(tmp / "tiny.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_encode_shows_a_progress_bar_with_images_per_second(run, tmp_path, capsys):
    encode_run(run, "train", tmp_path / "cache", batch_size=8, device="cpu", progress=True)
    captured = capsys.readouterr()
    assert "24/24" in captured.err and "img/s" in captured.err and "encode train" in captured.err
    assert "img/s" not in captured.out  # the bar is on stderr only
    # the default shows it only on a terminal: pytest's captured stderr is none, so it stays quiet
    encode_run(run, "train", tmp_path / "cache2", batch_size=8, device="cpu")
    assert "24/24" not in capsys.readouterr().err
