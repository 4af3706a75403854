"""Transforms, array / npz / folder datasets, splits and build_dataset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from twostage.config import ConfigError, from_dict
from twostage.data import (
    ArrayDataset,
    DataConfig,
    DataError,
    ImageFolderDataset,
    ImageTransform,
    ResumableLoader,
    build_dataset,
    flip_decision,
    split_indices,
)


def test_pad_shapes_and_background():
    img = np.full((28, 28), 255, dtype=np.uint8)
    t = ImageTransform(image_size=32, channels=3, resize="pad")(img, 0)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert t[:, 2:30, 2:30].eq(1).all() and t[:, :2].eq(-1).all() and t[:, :, 30:].eq(-1).all()
    gray = ImageTransform(image_size=32, channels=1)(img, 0)
    assert gray.shape == (1, 32, 32)
    big = ImageTransform(image_size=32)(np.zeros((64, 40, 3), dtype=np.uint8), 0)  # letterboxed, no crash
    assert big.shape == (3, 32, 32)


def test_resize_crop_shapes():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    for size in (64, 32):
        t = ImageTransform(image_size=size, resize="resize_crop")(rgb, 0)
        assert t.shape == (3, size, size) and -1 <= t.min() and t.max() <= 1
    small = Image.fromarray(rgb[:20, :30])  # upscaled when smaller than the target
    assert ImageTransform(image_size=32, resize="resize_crop", channels=1)(small, 0).shape == (1, 32, 32)
    rgba = Image.new("RGBA", (40, 50), (255, 0, 0, 0))  # fully transparent -> background
    t = ImageTransform(image_size=32, resize="resize_crop", background=255)(rgba, 0)
    assert t.eq(1).all()


def test_flip_is_a_pure_function_of_seed_epoch_index():
    decisions = [flip_decision(0, 3, i) for i in range(2000)]
    assert decisions == [flip_decision(0, 3, i) for i in range(2000)]
    assert 900 < sum(decisions) < 1100
    assert decisions != [flip_decision(0, 4, i) for i in range(2000)]
    assert decisions != [flip_decision(1, 3, i) for i in range(2000)]
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    ds = ArrayDataset(images, np.arange(8), ImageTransform(image_size=32, flip=True, seed=0))
    for i in range(8):
        plain, _ = ds[i]  # an int key: never augmented
        aug, label = ds[(i, 5)]
        assert label == i and torch.equal(aug, ds[(i, 5)][0])
        assert torch.equal(aug, plain.flip(-1) if flip_decision(0, 5, i) else plain)


def test_npz_and_missing_keys(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), labels=np.arange(10) % 2)
    ds = ArrayDataset.from_npz(tmp_path / "d.npz", ImageTransform(image_size=16))
    assert len(ds) == 10 and ds[3][0].shape == (3, 16, 16) and ds[3][1] == 1
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"lacks the key\(s\) \['images', 'labels'\].*pictures"):
        ArrayDataset.from_npz(tmp_path / "bad.npz")
    cfg = DataConfig(name="npz", root=str(tmp_path / "d.npz"), image_size=16, val_fraction=0.3)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (7, 3)
    with pytest.raises(DataError, match="val_fraction"):
        build_dataset(DataConfig(name="npz", root=str(tmp_path / "d.npz")), "val")


def test_split_indices_deterministic_disjoint_covering():
    tr, va = split_indices(1000, 0.1, seed=3)
    assert len(va) == 100 and len(np.intersect1d(tr, va)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    tr2, va2 = split_indices(1000, 0.1, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(va, split_indices(1000, 0.1, seed=4)[1])


def test_config_checks():
    with pytest.raises(ConfigError, match="needs data.root"):
        from_dict(DataConfig, {"name": "folder"})
    with pytest.raises(ConfigError, match="choose one of"):
        from_dict(DataConfig, {"resize": "stretch"})
    with pytest.raises(ConfigError, match="official 10k test set"):
        from_dict(DataConfig, {"val_fraction": 0.1})


def test_fashion_mnist_build_dataset():
    cfg = DataConfig(image_size=32, channels=3, flip=True)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (60000, 10000)
    image, label = train[(0, 0)]
    assert image.shape == (3, 32, 32) and label == 9 and image[:, 0].eq(-1).all()
    assert val.transform.flip is False and train.class_names[0] == "T-shirt/top"


def _png(path, color, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _make_folder(root):
    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(5):
            _png(root / c / f"{i}.png", color)
    _png(root / "dog" / "nested" / "5.png", (0, 0, 255))
    (root / "cat" / "notes.txt").write_text("not an image, ignored by extension")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "dog" / "3.png").write_bytes(b"garbage, not a png at all")  # unreadable
    return [root / "cat" / "2.png", root / "dog" / "3.png"]


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_skips_and_reports_bad_files_once(tmp_path, caplog, workers):
    bad = _make_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(tmp_path / "imgs", ImageTransform(image_size=16, resize="resize_crop"))
    assert len(ds) == 11 and ds.class_names == ["cat", "dog"]
    loader = ResumableLoader(ds, batch_size=11, shuffle=False, num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="twostage.data.folder"):
        images, labels = next(loader)  # one whole epoch, bad files inside it
        next(loader)  # a second epoch finds no new ones: no second line
        loader.close()
    assert images.shape == (11, 3, 16, 16)
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 1 and "skipped 2 unreadable" in lines[0] and str(bad[0]) in lines[0]
    assert sorted(ds.skipped) == sorted(bad)
    # Replacement is the next readable file: deterministic, label of the file actually loaded.
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert torch.equal(images[2], images[3]) and torch.equal(ds[2][0], ds[3][0])


def test_folder_scan_and_train_val_subfolders(tmp_path):
    bad = _make_folder(tmp_path / "d" / "train")
    _png(tmp_path / "d" / "val" / "dog" / "a.png", (0, 0, 255))  # val lacks "cat": labels must stay train's
    cfg = DataConfig(name="folder", root=str(tmp_path / "d"), image_size=16, resize="resize_crop")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 11 and len(val) == 1 and val[0][1] == 1
    assert sorted(train.scan()) == sorted(bad) and train.num_skipped == 2
    _png(tmp_path / "d" / "val" / "bird" / "b.png", (0, 255, 0))
    with pytest.raises(DataError, match="not among"):
        build_dataset(cfg, "val")
