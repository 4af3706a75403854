"""ImageFolderDataset: `root/<class>/**/<image>` at ImageNet scale, robust to bad files.

Design choices, all driven by 1.28M-file folders:
  - Listing uses os.scandir only (no per-file open or stat), sorted, so construction takes seconds
    and the order is the same on every machine.
  - Paths are stored as one uint8 buffer + offsets, not a list of str: with forked DataLoader
    workers a list of a million Python objects gets copied page by page as refcounts change
    (copy-on-write), multiplying memory by the number of workers; numpy buffers stay shared.
  - A file is only checked when it is loaded. An unreadable or truncated file is recorded in a flag
    tensor in shared memory and replaced by the next readable file (index + 1, + 2, ... wrapping),
    which is deterministic (it depends on the files alone, not on the worker or the timing), so exact
    resume still holds. Workers write the flags; the main process reads them, so counts found inside
    workers are reported too, in one log line per epoch at most (`report_skipped`, called by the
    loader at each epoch end), and `.skipped` lists them.
  - A file whose shorter side is below `min_size_ratio * image_size` (a 1x1 pixel, a thumbnail) is
    skipped and counted the same way (flag 2 instead of 1, `.too_small`): blown up to the model's input
    it would teach nothing but blur. Only the header is read for this check.
  - `scan()` checks every file up front, in threads, for those who prefer to know before training.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from twostage.data.datasets import Key, split_key
from twostage.data.errors import DataError
from twostage.data.transforms import ImageTransform

log = logging.getLogger(__name__)


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (".jpg", ...) of every format Pillow can open here."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _walk(folder: str, exts: frozenset[str]) -> list[str]:
    """Image files under `folder` (recursively), as paths relative to it; dot-files skipped."""
    out: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(folder, rel)) as it:
            for entry in it:
                if entry.name.startswith("."):  # e.g. macOS "._x.jpg" resource forks: not images
                    continue
                path = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    stack.append(path)
                elif os.path.splitext(entry.name)[1].lower() in exts and entry.is_file():
                    out.append(path)
    out.sort()
    return out


UNREADABLE, TOO_SMALL = 1, 2  # values of the per-file flag (0: fine or not looked at yet)


class ImageTooSmall(Exception):
    """An image smaller than the dataset accepts (its shorter side below `min_side` pixels)."""


def _open_image(path: str, min_side: float = 0.0) -> Image.Image:
    """Open and fully decode (so that truncation surfaces now, not later in a transform). An image whose
    shorter side is below `min_side` raises ImageTooSmall before it is decoded."""
    with open(path, "rb") as fh:
        img = Image.open(fh)
        if min(img.size) < min_side:
            raise ImageTooSmall(f"{img.width}x{img.height} pixels, below {min_side:g} on the shorter side")
        img.load()
    return img


class ImageFolderDataset(Dataset):
    """Images in class sub-folders of `root` (sorted folder names -> label ids 0, 1, ...).

    `class_names` fixes the label mapping (a val folder uses the train folder's classes). A root
    with images but no sub-folders is one class. `max_skip` bounds how many consecutive unreadable
    files are replaced before giving up (a whole broken folder should fail, not be papered over).
    `min_size_ratio`: images whose shorter side is below this fraction of the transform's image_size are
    skipped like unreadable ones (0 keeps all; the config's data.min_size_ratio).
    """

    def __init__(
        self,
        root: str | Path,
        transform: ImageTransform | None = None,
        *,
        class_names: Sequence[str] | None = None,
        extensions: Iterable[str] | None = None,
        scan: bool = False,
        max_skip: int = 64,
        min_size_ratio: float = 0.25,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder")
        exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions or image_extensions())
        with os.scandir(self.root) as it:
            dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        rel_paths: list[str] = []
        label_list: list[int] = []
        if dirs:
            names = list(class_names) if class_names is not None else dirs
            index = {name: i for i, name in enumerate(names)}
            unknown = [d for d in dirs if d not in index]
            if unknown:
                raise DataError(
                    f"{self.root} has class folder(s) {unknown[:5]} that are not among the {len(names)} "
                    f"training classes (e.g. {names[:5]}); the val folder must use the train folder's class names"
                )
            for d in dirs:
                files = _walk(str(self.root / d), exts)
                rel_paths.extend(f"{d}/{f}" for f in files)
                label_list.extend([index[d]] * len(files))
        else:  # an unlabelled folder (e.g. faces): one class
            names = list(class_names) if class_names is not None else [self.root.name]
            rel_paths = _walk(str(self.root), exts)
            label_list = [0] * len(rel_paths)
        if not rel_paths:
            raise DataError(
                f"no image files in {self.root} (looked for {', '.join(sorted(exts)[:8])}, ... in class "
                "sub-folders root/<class>/...). Check the path."
            )
        encoded = [os.fsencode(p) for p in rel_paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(label_list, dtype=np.int64)
        self.class_names = names
        self.transform = transform or ImageTransform(image_size=256, channels=3, resize="resize_crop")
        self.max_skip = max_skip
        if not 0 <= min_size_ratio <= 1:
            raise DataError(f"min_size_ratio={min_size_ratio} must be in [0, 1]")
        self.min_size_ratio = float(min_size_ratio)
        self.min_side = self.min_size_ratio * self.transform.image_size  # pixels, shorter side
        self.source = f"image folder {self.root}"
        # Shared between the main process and DataLoader workers (fork or spawn): UNREADABLE / TOO_SMALL.
        self._bad = torch.zeros(len(self.labels), dtype=torch.uint8).share_memory_()
        self._reported = {UNREADABLE: 0, TOO_SMALL: 0}
        if scan:
            self.scan()

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        a, b = self._offsets[index], self._offsets[index + 1]
        return self.root / os.fsdecode(self._buffer[a:b].tobytes())

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        index, epoch = split_key(key)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} images")
        index %= n
        last_error: Exception | None = None
        for step in range(min(self.max_skip + 1, n)):
            j = (index + step) % n
            if self._bad[j]:
                continue
            try:
                # The transform runs inside the try: some damaged files decode into images no
                # conversion accepts, and they must be skipped like unreadable ones.
                image = self.transform(_open_image(str(self.path(j)), self.min_side), index, epoch)
            except ImageTooSmall as err:
                self._bad[j] = TOO_SMALL
                last_error = err
                log.debug("image too small %s: %s", self.path(j), err)
                continue
            except Exception as err:  # Pillow raises many types for damaged data; none may end the epoch
                self._bad[j] = UNREADABLE
                last_error = err
                log.debug("unreadable image %s: %s", self.path(j), err)
                continue
            return image, int(self.labels[j])
        raise DataError(
            f"{min(self.max_skip + 1, n)} consecutive files from {self.path(index)} on are unreadable or too small "
            f"(last error: {last_error}); the folder looks damaged. Check it with "
            f"`twostage data info folder --root {self.root} --scan`."
        )

    # -- bad files ----------------------------------------------------------------------------------

    def _flagged(self, value: int | None = None) -> list[Path]:
        flags = self._bad.numpy()
        return [self.path(int(i)) for i in np.flatnonzero(flags if value is None else flags == value)]

    @property
    def skipped(self) -> list[Path]:
        """Paths skipped so far, unreadable or too small (in this process or any of its DataLoader workers)."""
        return self._flagged()

    @property
    def unreadable(self) -> list[Path]:
        return self._flagged(UNREADABLE)

    @property
    def too_small(self) -> list[Path]:
        """Paths skipped because their shorter side is below `min_side` pixels."""
        return self._flagged(TOO_SMALL)

    @property
    def num_skipped(self) -> int:
        return int((self._bad > 0).sum())

    @property
    def num_unreadable(self) -> int:
        return int((self._bad == UNREADABLE).sum())

    @property
    def num_too_small(self) -> int:
        return int((self._bad == TOO_SMALL).sum())

    def report_skipped(self) -> int:
        """Log one warning per reason (unreadable, too small) if files were skipped for it since the last
        report; returns the number skipped so far."""
        how = f"List them all with `twostage data info folder --root {self.root} --scan`."
        for value, count, paths, what in (
            (UNREADABLE, self.num_unreadable, self.unreadable, "unreadable image file(s)"),
            (TOO_SMALL, self.num_too_small, self.too_small,
             f"image(s) smaller than {self.min_side:g} px on the shorter side (data.min_size_ratio="
             f"{self.min_size_ratio:g} x image_size {self.transform.image_size}; 0 keeps every image)"),
        ):
            if count > self._reported[value]:
                examples = ", ".join(str(p) for p in paths[:3])
                log.warning("%s: skipped %d %s so far, each replaced by the next usable one (e.g. %s). %s",
                            self.root, count, what, examples, how)
                self._reported[value] = count
        return self.num_skipped

    def scan(self, decode: bool = True, threads: int = 8) -> list[Path]:
        """Check every file now (fully decoded, or only Pillow's cheaper `verify()`); returns the skipped
        ones (unreadable or too small; `.unreadable` and `.too_small` tell them apart).

        Threads suffice: Pillow releases the GIL while decoding. Found files are flagged, so training
        never opens them.
        """

        def flag(i: int) -> int:
            try:
                if decode:
                    _open_image(str(self.path(i)), self.min_side)
                else:
                    with Image.open(self.path(i)) as img:
                        if min(img.size) < self.min_side:
                            return TOO_SMALL
                        img.verify()
            except ImageTooSmall:
                return TOO_SMALL
            except Exception:
                return UNREADABLE
            return 0

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            flags = np.asarray(list(pool.map(flag, range(len(self)), chunksize=256)), dtype=np.uint8)
        for i in np.flatnonzero(flags):
            self._bad[int(i)] = int(flags[i])
        self.report_skipped()
        return self.skipped

    def image_shape(self) -> tuple[int, ...]:
        """Stored (H, W, C) of the first usable image (folders may mix sizes), else of the first readable
        one although it is too small."""
        first = None
        for i in range(min(len(self), self.max_skip + 1)):
            try:
                img = _open_image(str(self.path(i)))
            except Exception:
                continue
            shape = (img.height, img.width, len(img.getbands()))
            if min(img.size) >= self.min_side:
                return shape
            first = first or shape
        if first is not None:
            return first
        raise DataError(f"none of the first files in {self.root} is readable")

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.class_names)} classes)"


__all__ = ["ImageFolderDataset", "ImageTooSmall", "image_extensions"]
