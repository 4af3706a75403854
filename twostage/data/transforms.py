"""Image transforms: to the target size (pad or resize+center-crop), channel count, deterministic flip.

Every dataset turns a stored image (a uint8 numpy array or a PIL image) into a float32 tensor
(C, H, W) in [-1, 1] through `ImageTransform`. Randomness is never drawn from a global or per-worker
RNG: the flip decision is a pure function of (seed, epoch, index), so the same sample in the same
epoch looks the same no matter which DataLoader worker loads it, how many workers there are, or
whether the run was interrupted and resumed in between. With no epoch (a plain int index, as used
for evaluation) there is no augmentation at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from twostage.data.errors import DataError

RESIZE_MODES = ("pad", "resize_crop")
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijective scrambler of 64-bit integers with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 31)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample in one epoch; feeds every random augmentation decision."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a fair coin that depends on nothing else."""
    return bool(sample_seed(seed, epoch, index) >> 63)


# ---------------------------------------------------------------------------------------------------
# geometry (uint8 numpy arrays of shape (H, W, C))


def pad_to(arr: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Center `arr` on a size x size canvas filled with `value` (e.g. Fashion-MNIST 28 -> 32).

    An image larger than the target is first scaled down (aspect kept, so it fits: letterboxing)
    instead of failing, because a folder of mixed sizes must never crash mid-epoch.
    """
    h, w = arr.shape[:2]
    if h > size or w > size:
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        arr = _pil_resize(arr, (nw, nh), Image.Resampling.BICUBIC)
        h, w = nh, nw
    if h == size and w == size:
        return arr
    out = np.full((size, size, arr.shape[2]), value, dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = arr
    return out


def resize_center_crop(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """ADM-style: shrink the shorter side to `size` (box-halving, then bicubic), then center crop.

    Halving with a box filter while the image is at least twice the target avoids the aliasing a
    single large bicubic step would cause on big photos (ImageNet's are ~400x350 -> 256 or 64).
    """
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = _as_hwc(np.asarray(img))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _pil_resize(arr: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    return _as_hwc(np.asarray(img.resize(size, resample=resample)))


def _as_hwc(arr: np.ndarray) -> np.ndarray:
    return arr[..., None] if arr.ndim == 2 else arr


# ---------------------------------------------------------------------------------------------------
# channels


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit gray ("I;16*", and "I", the mode Pillow gives 16-bit PNG / PGM / TIFF gray) scaled to 8-bit
    "L" (v / 257, rounded: 65535 -> 255, so full white stays white and mid-gray stays mid-gray); other
    modes as they are. Pillow's own convert("L") clips such values at 255 instead, which turns nearly
    every pixel of a 16-bit image white."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    arr = np.asarray(img).astype(np.int64)  # "I;16B" is big-endian, "I" int32: one integer type
    arr = (np.clip(arr, 0, 65535) + 128) // 257
    return Image.fromarray(arr.astype(np.uint8))  # 2-D uint8: mode "L"


def pil_to_array(img: Image.Image, channels: int, background: int = 0) -> np.ndarray:
    """A PIL image of any mode as uint8 (H, W, channels); transparency is composited on `background`;
    16-bit gray is scaled to 8 bits (`to_8bit`), not clipped."""
    img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    return _as_hwc(np.asarray(img))


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, c) uint8 -> (H, W, channels): gray is repeated to RGB, RGB reduced by ITU-R 601 luma."""
    c = arr.shape[2]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if c in (3, 4) and channels == 1:
        luma = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    if c == 4 and channels == 3:
        return arr[..., :3]
    raise DataError(f"cannot convert an image with {c} channels to {channels} channels")


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # np.asarray(PIL image) is read-only; torch warns on those
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1)
    return t.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """Stored image -> model input. Picklable and stateless, so DataLoader workers need no setup."""

    image_size: int = 32
    channels: int = 3
    resize: str = "pad"
    flip: bool = False
    seed: int = 0
    background: int = 0  # pad colour and the colour behind transparent pixels (0 = black)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise DataError(f"resize={self.resize!r} is not a resize mode; choose one of {list(RESIZE_MODES)}")
        if self.channels not in (1, 3):
            raise DataError(f"channels={self.channels} must be 1 (grayscale) or 3 (RGB)")
        if self.image_size < 1:
            raise DataError(f"image_size={self.image_size} must be positive")

    def __call__(self, image: np.ndarray | Image.Image, index: int, epoch: int | None = None) -> torch.Tensor:
        """Transform sample `index`; augmentation (flip) only when an `epoch` is given."""
        if isinstance(image, Image.Image):
            arr = pil_to_array(image, self.channels, self.background)
            if self.resize == "resize_crop":
                arr = resize_center_crop(arr, self.image_size)
        else:
            arr = _as_hwc(np.asarray(image))
            if arr.dtype != np.uint8:
                raise DataError(f"expected a uint8 image array, got {arr.dtype}")
            if self.resize == "resize_crop":
                arr = resize_center_crop(arr, self.image_size)
        if self.resize == "pad":
            arr = pad_to(arr, self.image_size, self.background)
        # Channel conversion after resizing: repeating gray to RGB on the small image is cheaper.
        arr = to_channels(arr, self.channels)
        out = to_tensor(arr)
        if self.flip and epoch is not None and flip_decision(self.seed, epoch, index):
            out = out.flip(-1)
        return out

    def output_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


__all__ = [
    "ImageTransform", "RESIZE_MODES", "flip_decision", "pad_to", "pil_to_array", "resize_center_crop",
    "sample_seed", "to_8bit", "to_channels", "to_tensor",
]  # fmt: skip
