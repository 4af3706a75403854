"""`twostage data info` / `data prepare` through the CLI."""

from __future__ import annotations

import numpy as np
from PIL import Image

from twostage import cli


def _run(argv):
    return cli.main(argv)  # through the CLI's one error guard: config errors exit 2, data errors 1


def test_info_fashion_mnist(capsys):
    assert _run(["data", "info", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert "train:        60000 images" in out and "val:          10000 images" in out
    assert "classes:      10 (T-shirt/top, Trouser" in out and "Ankle boot" in out
    assert "image shape:  28x28x1" in out and "model input:  3x32x32" in out
    assert "source:" in out and "fashion-mnist" in out.split("source:")[1].splitlines()[0]


def test_prepare_fashion_mnist(capsys):
    assert _run(["data", "prepare", "fashion-mnist"]) == 0
    assert "fashion-mnist ready: 60000 train / 10000 val" in capsys.readouterr().out


def test_info_npz_folder_and_errors(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=np.zeros((20, 8, 8, 3), dtype=np.uint8), labels=np.arange(20) % 4)
    assert _run(["data", "info", "npz", "--root", str(tmp_path / "d.npz"), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "train:        15 images" in out and "val:          5 images" in out and "classes:      4" in out
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        Image.new("RGB", (9, 7)).save(tmp_path / "f" / c / "x.png")
    (tmp_path / "f" / "b" / "y.png").write_bytes(b"broken")
    assert _run(["data", "info", "folder", "--root", str(tmp_path / "f"), "--scan"]) == 0
    out = capsys.readouterr().out
    assert "train:        3 images" in out and "7x9x3" in out and "1 unreadable" in out and "y.png" in out
    assert "no val split" in out
    assert _run(["data", "info", "folder"]) == 2  # a config error: nothing ran
    assert "needs data.root" in capsys.readouterr().err
    assert _run(["data", "info", "npz", "--root", str(tmp_path / "missing.npz")]) == 1
    assert "no such .npz file" in capsys.readouterr().err
