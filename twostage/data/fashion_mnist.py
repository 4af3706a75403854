"""Fashion-MNIST, the embedded default dataset: find the idx files, fetch them if needed, decode, cache.

The files are looked for in this order (the first that has all four wins):
  (a) a folder the user names: the `root` argument or the env var TWOSTAGE_FASHION_MNIST;
  (b) the Debian package's install location, /usr/share/datasets/fashion-mnist/;
  (c) the cache (TWOSTAGE_CACHE, default ~/.cache/twostage/): the Debian package unpacked there by an
      earlier run, or else fetched now with `apt-get download dataset-fashion-mnist` + `dpkg -x`
      (neither needs root, so this works on any Debian/Ubuntu machine with package lists);
  (d) the official download URLs of the Fashion-MNIST project (for machines with a network but no apt).
Decoded arrays are cached as one uncompressed .npz keyed by the source files' paths, sizes and
mtimes, so a changed source is decoded again and a repeated load costs one file read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from twostage.data.errors import DataError
from twostage.data.idx import read_idx

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"train": 60000, "test": 10000}
ENV_ROOT = "TWOSTAGE_FASHION_MNIST"
ENV_CACHE = "TWOSTAGE_CACHE"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEB_PACKAGE = "dataset-fashion-mnist"
DEB_SUBDIR = Path("usr/share/datasets/fashion-mnist")  # inside the unpacked package
URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 of the official .gz files (the project's README); the Debian package recompresses them, so its
# checksums differ and only the downloads are checked against these.
URL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def cache_dir() -> Path:
    """The twostage cache folder: $TWOSTAGE_CACHE, else ~/.cache/twostage."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "twostage"


def _own_dir() -> Path:
    return cache_dir() / "fashion-mnist"


@dataclass
class FashionMNIST:
    """The decoded dataset: uint8 images (N, 28, 28) and uint8 labels (N,), per official split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where the idx files came from, in words
    folder: Path  # the folder holding the idx files
    class_names: tuple[str, ...] = CLASS_NAMES
    actions: list[str] = field(default_factory=list)  # what this load did (fetched, decoded, cached)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of "train" or "val"/"test" (Fashion-MNIST's val split is its test set)."""
        if name == "train":
            return self.train_images, self.train_labels
        if name in ("val", "test"):
            return self.test_images, self.test_labels
        raise DataError(f"fashion-mnist has no split '{name}'; use 'train' or 'val' (= the official test set)")


# ---------------------------------------------------------------------------------------------------
# locating the files


def find_files(folder: str | Path) -> tuple[dict[str, Path], list[str]]:
    """The four idx files in `folder` (name.gz or uncompressed name), and the names that are missing."""
    folder = Path(folder)
    found, missing = {}, []
    for name in (n for pair in FILES.values() for n in pair):
        for candidate in (folder / name, folder / name.removesuffix(".gz")):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    return found, missing


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive file lock, so that data-parallel ranks starting together fetch the data once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic renames below still keep the cache sane
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "w")
    except OSError:  # a read-only cache: the fetch below will report the real problem
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def locate(root: str | Path | None = None, *, fetch: bool = True, actions: list[str] | None = None) -> tuple[Path, str]:
    """The folder with the four idx files and a `source` string saying where it came from.

    With fetch=False nothing is downloaded (steps (c)-fetch and (d) are skipped).
    """
    actions = [] if actions is None else actions
    env = os.environ.get(ENV_ROOT)
    user = root if root is not None else env
    if user:  # (a) explicit: never silently fall back to something else
        folder = Path(user).expanduser()
        how = "the root argument" if root is not None else f"${ENV_ROOT}"
        _, missing = find_files(folder)
        if not folder.is_dir():
            raise DataError(f"Fashion-MNIST folder {folder} (from {how}) does not exist; fix the path or unset it")
        if missing:
            raise DataError(
                f"Fashion-MNIST folder {folder} (from {how}) lacks {', '.join(missing)}. Point it at a "
                f"folder with the four idx(.gz) files, or unset it to use the system package or the cache."
            )
        return folder, f"user folder {folder} (from {how})"
    tried = [f"{ENV_ROOT} (not set)"]
    if not find_files(SYSTEM_DIR)[1]:  # (b)
        return SYSTEM_DIR, f"Debian package {DEB_PACKAGE} installed at {SYSTEM_DIR}"
    tried.append(f"{SYSTEM_DIR} (package {DEB_PACKAGE} not installed)")
    deb_dir, dl_dir = _own_dir() / "deb" / DEB_SUBDIR, _own_dir() / "download"
    with _lock(_own_dir()) if fetch else contextlib.nullcontext():
        for folder, what in ((deb_dir, f"Debian package {DEB_PACKAGE}"), (dl_dir, "official download")):
            if not find_files(folder)[1]:  # (c) an earlier fetch
                return folder, f"{what} cached in {folder}"
        tried.append(f"cache {_own_dir()} (empty)")
        if not fetch:
            raise DataError(_not_found(tried, "fetching was disabled"))
        try:  # (c) fetch the Debian package now
            log.info("Fashion-MNIST not found locally: fetching %s with apt-get download (31 MB)", DEB_PACKAGE)
            folder = fetch_deb(_own_dir() / "deb")
            actions.append(f"fetched {DEB_PACKAGE} with `apt-get download` and unpacked it with `dpkg -x` into {folder}")
            return folder, f"Debian package {DEB_PACKAGE} fetched with apt-get download into {folder}"
        except DataError as err:
            tried.append(f"apt-get download {DEB_PACKAGE}: {err}")
            log.warning("could not fetch the Debian package (%s); trying the official download URLs", err)
        try:  # (d) last resort
            log.info("downloading Fashion-MNIST from %s", URL_BASE)
            folder = download(dl_dir)
            actions.append(f"downloaded the four idx files from {URL_BASE} into {folder}")
            return folder, f"official download from {URL_BASE} cached in {folder}"
        except DataError as err:
            tried.append(f"download from {URL_BASE}: {err}")
    raise DataError(_not_found(tried, "every source failed"))


def _not_found(tried: list[str], why: str) -> str:
    lines = "\n".join(f"  - {t}" for t in tried)
    return (
        f"Fashion-MNIST not found ({why}). Tried, in order:\n{lines}\nFix one of: "
        f"`sudo apt-get install {DEB_PACKAGE}`; or `apt-get download {DEB_PACKAGE} && dpkg -x "
        f"{DEB_PACKAGE}_*.deb {_own_dir() / 'deb'}`; or put the four idx .gz files in a folder and set "
        f"{ENV_ROOT}=/that/folder."
    )


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(cmd)}` did not finish within 15 minutes") from None
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        hint = " (the package lists may be missing: run `sudo apt-get update`)" if "locate package" in res.stderr else ""
        raise DataError(f"`{' '.join(cmd)}` failed with exit code {res.returncode}: {' | '.join(tail)}{hint}")


def fetch_deb(dest: str | Path) -> Path:
    """`apt-get download` the package in a temp dir, `dpkg -x` it, move the result to `dest`.

    Returns the idx folder inside `dest`. Neither command needs root. The move is an atomic rename,
    so an interrupted fetch never leaves a half-unpacked cache behind.
    """
    dest = Path(dest)
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if not apt or not dpkg:
        raise DataError(
            f"{'apt-get' if not apt else 'dpkg'} is not available on this machine; on a Debian/Ubuntu machine run "
            f"`apt-get download {DEB_PACKAGE} && dpkg -x {DEB_PACKAGE}_*.deb {dest}` and copy {dest} here"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o755)  # lets apt's unprivileged _apt user write there when run as root
        _run([apt, "download", DEB_PACKAGE], cwd=tmp_path)
        debs = sorted(tmp_path.glob("*.deb"))
        if not debs:
            raise DataError(f"`apt-get download {DEB_PACKAGE}` succeeded but left no .deb in {tmp_path}")
        _run([dpkg, "-x", str(debs[0]), str(tmp_path / "root")], cwd=tmp_path)
        missing = find_files(tmp_path / "root" / DEB_SUBDIR)[1]
        if missing:
            raise DataError(f"{debs[0].name} does not contain {', '.join(missing)} under /{DEB_SUBDIR}")
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete earlier unpack (a complete one would have been used)
        os.rename(tmp_path / "root", dest)
    return dest / DEB_SUBDIR


def download(dest: str | Path, base: str | None = None, timeout: float = 60.0) -> Path:
    """Download the four official .gz files (from `base`, default URL_BASE) into `dest`, checking MD5s."""
    dest, base = Path(dest), base or URL_BASE
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in URL_MD5.items():
        target = dest / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        url = base + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                payload = resp.read()
        except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
            raise DataError(f"could not download {url}: {err}") from None
        if hashlib.md5(payload).hexdigest() != md5:
            raise DataError(f"{url}: MD5 mismatch (expected {md5}); the download is damaged, try again")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
    return dest


# ---------------------------------------------------------------------------------------------------
# decoding and the decoded-array cache


def _cache_key(files: dict[str, Path]) -> tuple[str, str]:
    """(folder key, content key): stat-based, so a replaced or re-installed source is decoded again."""
    folder = hashlib.sha256(str(Path(next(iter(files.values()))).resolve().parent).encode()).hexdigest()[:12]
    h = hashlib.sha256()
    for name in sorted(files):
        st = files[name].stat()
        h.update(f"{files[name].resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return folder, h.hexdigest()[:12]


def decode(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Parse the four idx files and check shapes and label ranges."""
    out: dict[str, np.ndarray] = {}
    for split, (img_name, lbl_name) in FILES.items():
        images = read_idx(files[img_name], ndim=3, dtype=np.uint8)
        labels = read_idx(files[lbl_name], ndim=1, dtype=np.uint8)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(
                f"{files[img_name]} / {files[lbl_name]}: {images.shape} images vs {labels.shape} labels; "
                "expected (N, 28, 28) images and N labels"
            )
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise DataError(f"{files[lbl_name]}: label {labels.max()} is out of range 0..{len(CLASS_NAMES) - 1}")
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def load(root: str | Path | None = None, *, fetch: bool = True) -> FashionMNIST:
    """Locate (fetching if needed), decode (or read the decoded cache) and return Fashion-MNIST."""
    actions: list[str] = []
    folder, source = locate(root, fetch=fetch, actions=actions)
    files, _ = find_files(folder)
    folder_key, key = _cache_key(files)
    cached = _own_dir() / f"decoded-{folder_key}-{key}.npz"
    arrays = None
    if cached.is_file():
        try:
            with np.load(cached) as z:
                arrays = {k: z[k] for k in z.files}
            actions.append(f"read decoded arrays from {cached}")
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            log.warning("decoded cache %s is unreadable (%s); decoding the idx files again", cached, err)
    if arrays is None:
        arrays = decode(files)
        actions.append(f"decoded the idx files in {folder}")
        try:
            _own_dir().mkdir(parents=True, exist_ok=True)
            for old in _own_dir().glob(f"decoded-{folder_key}-*.npz"):
                if old != cached:
                    old.unlink(missing_ok=True)  # stale decode of the same folder
            with tempfile.NamedTemporaryFile(dir=_own_dir(), suffix=".npz.part", delete=False) as fh:
                np.savez(fh, **arrays)
            os.chmod(fh.name, 0o644)  # NamedTemporaryFile creates 0600; the cache may be shared
            os.replace(fh.name, cached)
            actions.append(f"cached decoded arrays in {cached}")
        except OSError as err:  # a read-only cache only costs a re-decode next time
            log.warning("could not write the decoded cache %s (%s); continuing without it", cached, err)
    return FashionMNIST(**arrays, source=source, folder=folder, actions=actions)


__all__ = [
    "CLASS_NAMES", "FashionMNIST", "cache_dir", "decode", "download", "fetch_deb", "find_files", "load", "locate",
]  # fmt: skip
