"""Faults a new user hits with an image folder: 16-bit PNGs, tiny images (issue "Faults a new user hits")."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from twostage import cli
from twostage.config import ConfigError, from_dict, to_dict
from twostage.data import build_dataset
from twostage.data.config import DataConfig
from twostage.data.folder import ImageFolderDataset
from twostage.data.transforms import ImageTransform, pil_to_array


def _gradient16() -> np.ndarray:
    """A 32x32 16-bit ramp over the whole range 0..65535."""
    return np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)


# -- 1. 16-bit PNG ---------------------------------------------------------------------------------


def test_16bit_png_in_a_folder_is_scaled_to_8bit_not_clipped_white(tmp_path):
    ramp = _gradient16()
    (tmp_path / "c").mkdir()
    Image.fromarray(ramp).save(tmp_path / "c" / "ramp.png")  # a real 16-bit grayscale PNG, written by PIL
    with Image.open(tmp_path / "c" / "ramp.png") as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() == 65535
    for channels in (1, 3):
        ds = ImageFolderDataset(tmp_path, ImageTransform(image_size=32, channels=channels))
        x, _ = ds[0]
        expected = torch.from_numpy(np.round(ramp / 257.0).astype(np.float32)) / 127.5 - 1
        assert x.shape == (channels, 32, 32)
        # every channel is the ramp scaled by 1/257: dark stays dark, white is 255, mid-gray is mid-gray
        assert torch.allclose(x, expected.expand(channels, 32, 32), atol=1.01 / 127.5)
        assert x.min() == -1 and x.max() == 1 and abs(float(x.mean())) < 0.01
        assert ds.num_skipped == 0


@pytest.mark.parametrize("mode_array", ["I;16", "I;16B", "I"])
def test_16bit_modes_are_scaled_by_257(mode_array):
    ramp = _gradient16()
    if mode_array == "I;16B":
        img = Image.frombytes("I;16B", (32, 32), ramp.astype(">u2").tobytes())
    elif mode_array == "I":
        img = Image.fromarray(ramp.astype(np.int32))
    else:
        img = Image.fromarray(ramp)
    assert img.mode == mode_array
    arr = pil_to_array(img, channels=1)
    assert arr.dtype == np.uint8 and arr.shape == (32, 32, 1)
    assert np.abs(arr[..., 0].astype(int) - np.round(ramp / 257.0).astype(int)).max() <= 1
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    # 8-bit images are untouched
    gray = Image.fromarray((ramp // 257).astype(np.uint8))
    assert np.array_equal(pil_to_array(gray, channels=1)[..., 0], (ramp // 257).astype(np.uint8))


# -- 2. tiny images --------------------------------------------------------------------------------


def _folder_with_a_tiny_image(root):
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "a" / "0.png")
    Image.new("RGB", (1, 1), (255, 255, 255)).save(root / "a" / "1.png")  # tiny: 1x1
    Image.new("RGB", (40, 32), (0, 0, 255)).save(root / "a" / "2.png")
    Image.new("RGB", (8, 30), (0, 255, 0)).save(root / "a" / "3.png")  # 8 = 0.25 x 32: kept
    return root / "a" / "1.png"


def test_tiny_images_are_skipped_and_counted(tmp_path, caplog):
    tiny = _folder_with_a_tiny_image(tmp_path / "f")
    cfg = DataConfig(name="folder", root=str(tmp_path / "f"), image_size=32)
    assert cfg.min_size_ratio == 0.25
    ds = build_dataset(cfg, "train")
    assert len(ds) == 4
    # the 1x1 image is replaced by the next usable one (deterministic), like an unreadable file
    assert torch.equal(ds[1][0], ds[2][0])
    assert ds.too_small == [tiny] and ds.num_too_small == 1 and ds.num_unreadable == 0
    assert ds.skipped == [tiny] and ds.num_skipped == 1
    with caplog.at_level(logging.WARNING, logger="twostage.data.folder"):
        ds.report_skipped()
        ds.report_skipped()  # nothing new: no second line
    lines = [r.getMessage() for r in caplog.records if "smaller than" in r.getMessage()]
    assert len(lines) == 1 and "skipped 1 image(s) smaller than 8 px" in lines[0] and str(tiny) in lines[0]
    # ratio 0 keeps every image (the 1x1 one is then blown up to 32x32, as before)
    keep = build_dataset(DataConfig(name="folder", root=str(tmp_path / "f"), image_size=32, min_size_ratio=0), "train")
    assert not torch.equal(keep[1][0], keep[2][0]) and keep.num_skipped == 0
    # scan() finds it up front too, without decoding (verify) or with it
    for decode in (False, True):
        fresh = build_dataset(cfg, "train")
        assert fresh.scan(decode=decode) == [tiny] and fresh.too_small == [tiny]


def test_min_size_ratio_config_option(tmp_path):
    from twostage import api

    run = api.load_config("vq_fmnist_f4", ["data.min_size_ratio=0.1"], group="tokenizer")
    assert run.data.min_size_ratio == 0.1
    with pytest.raises(ConfigError, match="data.min_size_ratio"):
        api.load_config("vq_fmnist_f4", ["data.min_size_ratio=-1"], group="tokenizer")
    cfg = from_dict(DataConfig, {"min_size_ratio": 0.5})
    assert cfg.min_size_ratio == 0.5 and to_dict(cfg)["min_size_ratio"] == 0.5
    with pytest.raises(ConfigError, match="min_size_ratio"):
        from_dict(DataConfig, {"min_size_ratio": 2})
    # at its default it stays out of config.yaml and config hashes, so older runs resume unchanged
    assert "min_size_ratio" not in to_dict(DataConfig())
    assert from_dict(DataConfig, to_dict(DataConfig())).min_size_ratio == 0.25


def test_data_info_reports_the_too_small_count(tmp_path, capsys):
    tiny = _folder_with_a_tiny_image(tmp_path / "f")
    (tmp_path / "f" / "a" / "4.png").write_bytes(b"broken")
    assert cli.main(["data", "info", "folder", "--root", str(tmp_path / "f"), "--scan"]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable file(s)" in out and "4.png" in out
    assert "1 image(s) too small" in out and str(tiny) in out and "8 px" in out
