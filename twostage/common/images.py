"""Image grids for reconstruction previews (PIL; no torchvision dependency)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 (H', W', 3) array, row-major."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow)).save(path)
    return path


def interleave_pairs(originals: torch.Tensor, recons: torch.Tensor, per_row: int = 8) -> tuple[torch.Tensor, int]:
    """Rows alternate: `per_row` originals, then their reconstructions underneath. Returns (images, nrow)."""
    n = originals.shape[0]
    per_row = min(per_row, n)
    chunks = []
    for start in range(0, n, per_row):
        o, r = originals[start : start + per_row], recons[start : start + per_row]
        if o.shape[0] < per_row:  # pad the last row with blanks (white = +1)
            fill = per_row - o.shape[0]
            o = torch.cat([o, o.new_ones(fill, *o.shape[1:])])
            r = torch.cat([r, r.new_ones(fill, *r.shape[1:])])
        chunks += [o, r.to(o.dtype)]
    return torch.cat(chunks), per_row


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)
