"""Pre-extracted stage-1 outputs for stage-2 training: discrete token ids or continuous latents.

Stage 2 never runs the tokenizer while training: the dataset is encoded once (each image and its
horizontal flip, so augmentation costs nothing later) into a folder

    tokens.npy   (N, V, L) token ids, V variants (0 = plain, 1 = flipped), L = h * w in raster order;
                 uint16 when the codebook has <= 65536 codes, else int32         (discrete)
    latents.npy  (N, V, C, h, w) float16 latents                                    (continuous)
    labels.npy   (N,) int64 class labels
    meta.json    kind, grid, codebook size or channels, classes, latent statistics, tokenizer checksum

All arrays are memory-mapped, so an ImageNet-size cache costs no RAM and starts instantly.
"""

from __future__ import annotations

from twostage.common.errors import UserError

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenCacheError(UserError, ValueError):
    pass


@dataclass
class CacheMeta:
    kind: str  # "tokens" (discrete) or "latents" (continuous)
    grid: tuple[int, int]  # (h, w) of the latent grid
    num_classes: int
    tokenizer_run: str
    tokenizer_checksum: str  # sha256 of the tokenizer weights that made the cache
    split: str
    codebook_size: int | None = None  # discrete
    channels: int | None = None  # continuous
    # Per-channel mean / std over the cache (continuous): stage 2 trains on normalized latents.
    latent_mean: list[float] | None = None
    latent_std: list[float] | None = None
    image_size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def write_cache(folder: Path, meta: CacheMeta, labels: np.ndarray, *, tokens: np.ndarray | None = None,
                latents: np.ndarray | None = None) -> None:
    """Write a cache folder; arrays are validated against `meta` first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    if meta.kind == "tokens":
        if tokens is None or tokens.ndim != 3 or tokens.shape[0] != n or tokens.shape[2] != meta.seq_len:
            raise TokenCacheError(f"tokens must be (N={n}, V, L={meta.seq_len}); got {None if tokens is None else tokens.shape}")
        np.save(folder / "tokens.npy", tokens.astype(token_dtype(meta.codebook_size), copy=False))
    elif meta.kind == "latents":
        if latents is None or latents.ndim != 5 or latents.shape[0] != n or tuple(latents.shape[3:]) != tuple(meta.grid):
            raise TokenCacheError(f"latents must be (N={n}, V, C, {meta.grid[0]}, {meta.grid[1]}); got "
                                  f"{None if latents is None else latents.shape}")
        np.save(folder / "latents.npy", latents.astype(np.float16, copy=False))
    else:
        raise TokenCacheError(f"unknown cache kind {meta.kind!r}; use 'tokens' or 'latents'")
    np.save(folder / "labels.npy", labels.astype(np.int64, copy=False))
    (folder / "meta.json").write_text(json.dumps(asdict(meta), indent=2))


def read_meta(folder: Path) -> CacheMeta:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise TokenCacheError(
            f"{folder} is not a token/latent cache (no meta.json). Make one with "
            "`twostage tokenizer encode RUN --split train --out CACHE`."
        )
    data = json.loads(path.read_text())
    data["grid"] = tuple(data["grid"])
    return CacheMeta(**data)


class CacheDataset(Dataset):
    """Samples (tokens (L,) int64 | latents (C,h,w) float32, label) from a cache folder.

    Indexed by `(index, epoch)` (as the engine's sampler does), the variant (plain or flipped) is a
    pure function of (seed, epoch, index), so resumed runs see exactly the same data; an int index
    always gives the plain variant (validation).
    """

    def __init__(self, folder: Path, seed: int = 0, random_variant: bool = True):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        name = "tokens.npy" if self.meta.kind == "tokens" else "latents.npy"
        self.data = np.load(self.folder / name, mmap_mode="r")
        self.labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        if len(self.data) != len(self.labels):
            raise TokenCacheError(f"{self.folder}: {len(self.data)} items but {len(self.labels)} labels; re-encode it")
        self.seed, self.random_variant = seed, random_variant

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def variants(self) -> int:
        return self.data.shape[1]

    def variant(self, index: int, epoch: int) -> int:
        if not self.random_variant or self.variants == 1:
            return 0
        # A cheap integer hash of (seed, epoch, index): no RNG state to carry across workers.
        h = (index * 0x9E3779B1 + epoch * 0x85EBCA77 + self.seed * 0xC2B2AE3D) & 0xFFFFFFFF
        h ^= h >> 15
        return (h * 0x2C1B3C6D & 0xFFFFFFFF) % self.variants

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, None)
        v = 0 if epoch is None else self.variant(index, epoch)
        x = np.asarray(self.data[index, v])
        if self.meta.kind == "tokens":
            out = torch.from_numpy(x.astype(np.int64))
        else:
            out = torch.from_numpy(x.astype(np.float32))
        return out, int(self.labels[index])
