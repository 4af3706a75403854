"""DataConfig: the `data:` section of every training config."""

from __future__ import annotations

from dataclasses import dataclass, field

from twostage.config import ConfigError, check

DATASET_NAMES = ("fashion-mnist", "folder", "npz", "emoji")


@dataclass
class DataConfig:
    name: str = field(
        default="fashion-mnist",
        metadata=check(choices=DATASET_NAMES),  # fashion-mnist (embedded default), folder (ImageFolder), npz
    )
    # folder: root/<class>/... or root/train + root/val; npz: a file with `images`/`labels` or a folder
    # with train.npz (+ val.npz); fashion-mnist: an optional folder with the four idx(.gz) files.
    root: str | None = None
    image_size: int = field(default=32, metadata=check(ge=8, le=4096))
    channels: int = field(default=3, metadata=check(choices=(1, 3)))
    # pad: center on a canvas (28 -> 32 for Fashion-MNIST; larger images are scaled down to fit);
    # resize_crop: shorter side to image_size, then center crop (ADM's ImageNet preprocessing).
    resize: str = field(default="pad", metadata=check(choices=("pad", "resize_crop")))
    flip: bool = True  # random horizontal flip of training images, a pure function of (seed, epoch, index)
    # Held out for "val" when a folder / npz has no separate val set; 0 = no val split.
    val_fraction: float = field(default=0.0, metadata=check(ge=0, lt=1))
    seed: int = 0  # seeds the train/val split and the flips (not the sample order: that is train.seed)
    background: int = field(default=0, metadata=check(ge=0, le=255))  # pad and transparency colour
    # folder: an image whose shorter side is below min_size_ratio * image_size (e.g. < 8 px for 32, < 64 px
    # for 256) is skipped and counted like an unreadable file, instead of being blown up from a few pixels;
    # 0 keeps every image. (fashion-mnist / npz arrays are all one known size and are never skipped.)
    # `added`: left out of config.yaml and config hashes while at its default, so older runs still resume.
    min_size_ratio: float = field(default=0.25, metadata=check(ge=0, le=1, added=True))

    def check(self) -> None:
        if self.name in ("folder", "npz") and not self.root:
            example = "/data/imagenet" if self.name == "folder" else "/data/images.npz"
            raise ConfigError(f"data.name={self.name} needs data.root (e.g. data.root={example})")
        if self.name in ("fashion-mnist", "emoji") and self.val_fraction > 0:
            which = "official 10k test set" if self.name == "fashion-mnist" else "test split (held-out emoji)"
            raise ConfigError(
                f"data.val_fraction applies to folder/npz data only: {self.name}'s val split is its "
                f"{which}; set data.val_fraction=0"
            )


__all__ = ["DATASET_NAMES", "DataConfig"]
