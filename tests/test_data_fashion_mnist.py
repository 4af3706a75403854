"""idx parsing and Fashion-MNIST locating / fetching / caching (the real data is fetched once if absent)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from twostage.data import fashion_mnist as fm
from twostage.data.errors import DataError
from twostage.data.idx import read_idx, write_idx


def _idx_bytes(arr: np.ndarray) -> bytes:
    """Written by hand here (not with write_idx) so the reader is checked against the format itself."""
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_tiny_idx_plain_and_gzipped(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name, ndim=3, dtype=np.uint8)
        assert out.shape == (2, 3, 4) and out.dtype == np.uint8 and np.array_equal(out, arr)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l.gz", labels), ndim=1), labels)
    wide = np.array([[1, -2], [300000, 4]], dtype=np.int32)  # multi-byte dtypes are big-endian on disk
    assert np.array_equal(read_idx(write_idx(tmp_path / "w.idx", wide)), wide)


def test_idx_errors_are_clear(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    good = _idx_bytes(arr)
    (tmp_path / "short.idx").write_bytes(good[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "short.gz").write_bytes(gzip.compress(good)[:-40])  # a cut-off download
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "magic.idx").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "ok.idx").write_bytes(good)
    with pytest.raises(DataError, match="1-dimensional"):
        read_idx(tmp_path / "ok.idx", ndim=1)


def _fake_fmnist(folder: Path, n_train: int = 6, n_test: int = 4, value: int = 7) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = fm.FILES[split]
        write_idx(folder / img_name, np.full((n, 28, 28), value, dtype=np.uint8))
        write_idx(folder / lbl_name, (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No system package, an empty cache, no user folder."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv(fm.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(fm.ENV_ROOT, raising=False)
    return tmp_path


def test_locate_order_and_source(isolated, monkeypatch):
    tmp = isolated
    cached = _fake_fmnist(tmp / "cache" / "fashion-mnist" / "deb" / fm.DEB_SUBDIR, value=1)
    assert "cached in" in fm.locate(fetch=False)[1]
    _fake_fmnist(fm.SYSTEM_DIR, value=2)
    folder, source = fm.locate(fetch=False)
    assert folder == fm.SYSTEM_DIR and "installed at" in source  # (b) before (c)
    user = _fake_fmnist(tmp / "user", value=3)
    monkeypatch.setenv(fm.ENV_ROOT, str(user))
    assert fm.locate(fetch=False) == (user, f"user folder {user} (from ${fm.ENV_ROOT})")  # (a) first
    data = fm.load(tmp / "user")
    assert data.source.startswith("user folder") and data.train_images.shape == (6, 28, 28)
    assert int(data.train_images[0, 0, 0]) == 3 and cached.is_dir()
    with pytest.raises(DataError, match="lacks"):
        fm.locate(tmp / "cache")  # an explicit folder never falls back silently


def test_decoded_cache_is_keyed_on_the_source(isolated):
    user = _fake_fmnist(isolated / "user", value=5)
    first = fm.load(user)
    assert any("cached decoded arrays" in a for a in first.actions)
    second = fm.load(user)
    assert any("read decoded arrays" in a for a in second.actions)
    assert np.array_equal(first.train_images, second.train_images)
    _fake_fmnist(user, n_train=8, value=9)  # the source changed: decode again
    path = user / fm.FILES["train"][0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = fm.load(user)
    assert any("decoded the idx files" in a for a in third.actions)
    assert third.train_images.shape == (8, 28, 28) and int(third.train_images[0, 0, 0]) == 9
    assert len(list((isolated / "cache" / "fashion-mnist").glob("decoded-*.npz"))) == 1  # stale one removed


def test_failed_fetch_says_what_was_tried(isolated, monkeypatch):
    bin_dir = isolated / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake.chmod(0o755)
    os.symlink(shutil.which("dpkg") or "/bin/true", bin_dir / "dpkg")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(fm, "URL_BASE", "http://127.0.0.1:9/")  # connection refused at once
    with pytest.raises(DataError) as err:
        fm.load()
    text = str(err.value)
    assert "apt-get download dataset-fashion-mnist" in text and "apt-get update" in text
    assert "127.0.0.1:9" in text and "sudo apt-get install dataset-fashion-mnist" in text
    monkeypatch.setenv("PATH", str(isolated / "nothing"))  # no apt-get at all
    with pytest.raises(DataError, match="apt-get is not available"):
        fm.fetch_deb(isolated / "cache" / "x")


def _real_data_reachable() -> bool:
    if os.environ.get(fm.ENV_ROOT) or not fm.find_files(fm.SYSTEM_DIR)[1]:
        return True
    if not fm.find_files(fm.cache_dir() / "fashion-mnist" / "deb" / fm.DEB_SUBDIR)[1]:
        return True
    return shutil.which("apt-get") is not None and shutil.which("dpkg") is not None


@pytest.mark.skipif(not _real_data_reachable(), reason="Fashion-MNIST not installed and apt-get unavailable")
def test_real_fashion_mnist_counts():
    data = fm.load()  # fetches the Debian package into the cache the first time
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert data.train_images.dtype == np.uint8
    assert len(data.class_names) == 10 and data.class_names[9] == "Ankle boot"
    assert np.array_equal(np.bincount(data.train_labels, minlength=10), np.full(10, 6000))
    assert np.array_equal(np.bincount(data.test_labels, minlength=10), np.full(10, 1000))
    assert data.source and str(data.folder) in data.source
