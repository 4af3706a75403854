"""From a DataConfig to a Dataset (`build_dataset`), and a summary of a dataset (`describe`).

Split names are "train" and "val" for every dataset:
  - fashion-mnist: the official train (60k) and test (10k) sets;
  - folder: root/train and root/val when present, else a deterministic split of root by val_fraction;
  - npz: root/train.npz and root/val.npz when root is a folder, else a split of the file by val_fraction;
  - emoji: its train and test splits (whole emoji held out; twostage/data/emoji.py).
Only "train" gets random flips; "val" is never augmented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from twostage.data import fashion_mnist
from twostage.data.config import DataConfig
from twostage.data.datasets import ArrayDataset, SubsetDataset, split_indices
from twostage.data.errors import DataError
from twostage.data.folder import ImageFolderDataset
from twostage.data.transforms import ImageTransform

SPLITS = ("train", "val")


def make_transform(cfg: DataConfig, split: str) -> ImageTransform:
    return ImageTransform(
        image_size=cfg.image_size,
        channels=cfg.channels,
        resize=cfg.resize,
        flip=cfg.flip and split == "train",
        seed=cfg.seed,
        background=cfg.background,
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use one of {list(SPLITS)}")


def _split(dataset: Dataset, cfg: DataConfig, split: str, what: str) -> Dataset:
    """Carve the val part out of a dataset that has no separate val set."""
    if cfg.val_fraction <= 0:
        if split == "val":
            raise DataError(
                f"{what} has no separate val set; set data.val_fraction (e.g. 0.05) to hold out a "
                "deterministic part of it, or provide one"
            )
        return dataset
    train_idx, val_idx = split_indices(len(dataset), cfg.val_fraction, cfg.seed)
    return SubsetDataset(dataset, train_idx if split == "train" else val_idx)


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset of `split` ("train" or "val") described by `cfg`; items are (image, label)."""
    _check_split(split)
    transform = make_transform(cfg, split)
    if cfg.name == "fashion-mnist":
        fm = fashion_mnist.load(cfg.root)
        images, labels = fm.split(split)
        return ArrayDataset(images, labels, transform, class_names=fm.class_names, source=fm.source)
    if cfg.name == "emoji":
        from twostage.data import emoji

        return emoji.build_dataset(cfg.root, split, transform)
    if not cfg.root:
        raise DataError(f"data.name={cfg.name} needs data.root")
    root = Path(cfg.root).expanduser()
    if cfg.name == "npz":
        if root.is_dir():
            files = {s: root / f"{s}.npz" for s in SPLITS}
            if not files["train"].is_file():
                raise DataError(f"{root} is a folder without train.npz; give an .npz file or a folder with train.npz (+ val.npz)")
            if files["val"].is_file():
                return ArrayDataset.from_npz(files[split], transform)
            return _split(ArrayDataset.from_npz(files["train"], transform), cfg, split, f"{root}/train.npz")
        return _split(ArrayDataset.from_npz(root, transform), cfg, split, str(root))
    if cfg.name == "folder":
        def folder(path: Path, **kwargs) -> ImageFolderDataset:
            return ImageFolderDataset(path, transform, min_size_ratio=cfg.min_size_ratio, **kwargs)

        if (root / "train").is_dir():
            if split == "train":
                return folder(root / "train")
            if not (root / "val").is_dir():
                return _split(folder(root / "train"), cfg, split, f"{root}/train")
            classes = _class_folders(root / "train") or None  # the label ids must match train's
            return folder(root / "val", class_names=classes)
        return _split(folder(root), cfg, split, str(root))
    raise DataError(f"unknown dataset name '{cfg.name}'; use fashion-mnist, emoji, folder or npz")


@dataclass
class DatasetInfo:
    name: str
    source: str
    splits: dict[str, int]  # split -> number of images
    image_shape: tuple[int, ...]  # stored (H, W, C) (of the first image, for folders)
    output_shape: tuple[int, int, int]  # (C, H, W) after the configured transform
    class_names: list[str]
    notes: list[str] = field(default_factory=list)  # what was fetched / decoded / skipped


def describe(cfg: DataConfig, scan: bool = False) -> DatasetInfo:
    """Counts per split, shapes, classes and provenance; `scan` checks every image of a folder."""
    notes: list[str] = []
    if cfg.name == "emoji":
        from twostage.data import emoji

        d = emoji.describe(cfg)
        return DatasetInfo("emoji", d["source"], d["splits"], d["image_shape"], make_transform(cfg, "val").output_shape(),
                           d["class_names"], d["notes"])
    if cfg.name == "fashion-mnist":
        fm = fashion_mnist.load(cfg.root)
        notes.extend(fm.actions)
        return DatasetInfo(
            cfg.name, fm.source, {"train": len(fm.train_labels), "val": len(fm.test_labels)},
            (*fm.train_images.shape[1:], 1), make_transform(cfg, "val").output_shape(),
            list(fm.class_names), notes + ["val = the official test set"],
        )  # fmt: skip
    splits: dict[str, int] = {}
    first = None
    scanned: set[Path] = set()  # a split folder is listed once per split but scanned once
    for split in SPLITS:
        try:
            ds = build_dataset(cfg, split)
        except DataError as err:
            if split == "val" and "no separate val set" in str(err):
                notes.append("no val split (set data.val_fraction to hold one out)")
                continue
            raise
        splits[split] = len(ds)
        if scan:
            base = ds.dataset if isinstance(ds, SubsetDataset) else ds
            if isinstance(base, ImageFolderDataset) and base.root not in scanned:
                base.scan()
                scanned.add(base.root)
                bad, small = base.unreadable, base.too_small
                notes.append(f"scan of {base.root}: {len(bad)} unreadable file(s)" + "".join(f"\n    {p}" for p in bad))
                if cfg.min_size_ratio > 0:
                    notes.append(
                        f"scan of {base.root}: {len(small)} image(s) too small, skipped (shorter side below "
                        f"{base.min_side:g} px = data.min_size_ratio {cfg.min_size_ratio:g} x image size "
                        f"{cfg.image_size})" + "".join(f"\n    {p}" for p in small)
                    )
        first = first or ds
    assert first is not None
    return DatasetInfo(
        cfg.name, first.source, splits, first.image_shape(), make_transform(cfg, "val").output_shape(),
        list(first.class_names), notes,
    )  # fmt: skip


__all__ = ["DatasetInfo", "SPLITS", "build_dataset", "describe", "make_transform"]
