"""In-memory datasets, subsets and deterministic splits.

All datasets of this package return `(image, label)`: image a float32 tensor (C, H, W) in [-1, 1],
label an int. They accept two kinds of key:
  - an int index: the sample without augmentation (evaluation, inspection);
  - an `(index, epoch)` tuple, as yielded by `ResumableSampler`: the sample with the augmentation of
    that epoch, a pure function of (seed, epoch, index), so a resumed run sees the very same pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from twostage.data.errors import DataError
from twostage.data.transforms import ImageTransform

Key = int | tuple[int, int]

# The .npz members that hold images and labels, in the order looked for: ADM's layout first (arr_0 uint8
# NHWC, arr_1 labels: what `generator sample` writes and what published reference batches hold), then
# this package's older names (datasets and samples files written before the switch), then `samples`
# (other samplers). Every reader of image .npz files resolves its keys here, so they accept the same files.
NPZ_IMAGE_KEYS = ("arr_0", "images", "samples")
NPZ_LABEL_KEYS = ("arr_1", "labels")


def npz_keys(files: Sequence[str]) -> tuple[str | None, str | None]:
    """(images key, labels key) among the member names of an .npz (`np.load(path).files`); None where absent."""
    return (next((k for k in NPZ_IMAGE_KEYS if k in files), None),
            next((k for k in NPZ_LABEL_KEYS if k in files), None))


def split_key(key: Any) -> tuple[int, int | None]:
    """(index, epoch or None) from an int index or an (index, epoch) pair."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key must be an index or an (index, epoch) pair, got {key!r}")
        return int(key[0]), int(key[1])
    if isinstance(key, torch.Tensor):
        key = key.item()
    return int(key), None


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index arrays: a seeded permutation, each part sorted.

    The permutation depends on (n, seed) only, so train and val never overlap and stay the same on
    every machine and run. Sorting keeps reads of a folder dataset roughly sequential on disk.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1  # a non-zero fraction asks for a val split: give it at least one sample
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


class ArrayDataset(Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) with integer labels (N,), held in memory.

    Arrays are kept as numpy arrays (not lists of objects), so forked DataLoader workers share
    them without copying.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | Sequence[int],
        transform: ImageTransform | None = None,
        class_names: Sequence[str] | None = None,
        source: str = "arrays",
    ):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (0..255), got {images.dtype}; convert with (x * 255).round().astype('uint8')")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise DataError(f"images must have shape (N, H, W) or (N, H, W, C) with C in 1/3/4, got {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"labels must have shape ({images.shape[0]},) to match the images, got {labels.shape}")
        if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
            raise DataError(f"labels must be non-negative integers, got dtype {labels.dtype}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.transform = transform or ImageTransform(image_size=max(images.shape[1:3]), channels=3)
        n_classes = int(self.labels.max()) + 1 if self.labels.size else 0
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        self.source = source

    @classmethod
    def from_npz(cls, path: str | Path, transform: ImageTransform | None = None, **kwargs: Any) -> ArrayDataset:
        """Load images and labels (`images` / `labels`, or ADM's `arr_0` / `arr_1`: see NPZ_IMAGE_KEYS) and
        optionally `class_names` from an .npz file. An ADM batch without labels (the unconditional reference
        batches, e.g. LSUN) is one class, label 0: a reference set needs its images only."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such .npz file")
        try:
            with np.load(path, allow_pickle=False) as z:
                image_key, label_key = npz_keys(z.files)
                if image_key is None or (label_key is None and image_key != "arr_0"):
                    missing = [name for name, key in (("images", image_key), ("labels", label_key)) if key is None]
                    raise DataError(
                        f"{path} lacks the key(s) {missing} (or ADM's arr_0 / arr_1); it has {sorted(z.files)}. "
                        "Save it with np.savez(path, images=uint8 (N,H,W[,C]), labels=int (N,))"
                    )
                images = z[image_key]
                labels = z[label_key] if label_key else np.zeros(len(images), np.int64)
                names = [str(x) for x in z["class_names"]] if "class_names" in z.files else None
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npz file ({err})") from None
        kwargs.setdefault("class_names", names)
        kwargs.setdefault("source", f"npz file {path}")
        return cls(images, labels, transform, **kwargs)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int]:
        index, epoch = split_key(key)
        return self.transform(self.images[index], index, epoch), int(self.labels[index])

    def image_shape(self) -> tuple[int, ...]:
        """Stored shape of one image (H, W, C)."""
        shape = self.images.shape[1:]
        return shape if len(shape) == 3 else (*shape, 1)


class SubsetDataset(Dataset):
    """The samples `indices` of `dataset`, passing (index, epoch) keys through.

    torch's Subset would index its index list with the tuple; this maps the index part only and
    hands the parent the parent's index, so a sample's augmentation is the same in every subset.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Key) -> Any:
        index, epoch = split_key(key)
        parent = int(self.indices[index])
        return self.dataset[parent if epoch is None else (parent, epoch)]

    def __getattr__(self, name: str) -> Any:
        # class_names, transform, skipped, report_skipped, ... come from the parent.
        if name == "dataset":  # not set yet (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


__all__ = ["ArrayDataset", "Key", "NPZ_IMAGE_KEYS", "NPZ_LABEL_KEYS", "SubsetDataset", "npz_keys", "split_indices",
           "split_key"]
