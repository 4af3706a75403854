"""Pre-extracted stage-1 outputs for stage-2 training: discrete token ids or continuous latents.

Stage 2 never runs the tokenizer while training: the dataset is encoded once (each image and its
horizontal flip, so augmentation costs nothing later) into a folder

    tokens.npy   (N, V, L) token ids, V variants (0 = plain, 1 = flipped), L = h * w in raster order;
                 uint16 when the codebook has <= 65536 codes, else int32         (discrete)
    latents.npy  (N, V, C, h, w) float16 latents                                    (continuous)
    labels.npy   (N,) int64 class labels
    meta.json    kind, grid, codebook size or channels, classes, latent statistics, tokenizer checksum

All arrays are memory-mapped, so an ImageNet-size cache costs no RAM and starts instantly. Opening a
cache checks that every file is whole (a copy cut short, a full disk): a damaged file is a
`TokenCacheError` naming it and the command that rebuilds the cache, never a numpy traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from twostage.common.errors import UserError


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


# What each cache kind stores: its array file, and the dtype stage 2 reads an item as.
ARRAYS = {"tokens": ("tokens.npy", np.int64), "latents": ("latents.npy", np.float32)}


def reencode_hint(folder: Path, meta: CacheMeta | None = None) -> str:
    """The command that rebuilds the cache `folder` (from its meta.json when it could be read)."""
    run = meta.tokenizer_run if meta is not None and meta.tokenizer_run else "TOKENIZER_RUN"
    split = meta.split if meta is not None and meta.split else "SPLIT"
    return f"re-encode it: `twostage tokenizer encode {run} --split {split} --out {folder} --overwrite`"


def read_meta(folder: Path) -> CacheMeta:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise TokenCacheError(
            f"{folder} is not a token/latent cache (no meta.json). Make one with "
            "`twostage tokenizer encode RUN --split train --out CACHE`."
        )
    try:
        data = json.loads(path.read_text())
        data["grid"] = tuple(int(g) for g in data["grid"])
        kind = data.get("kind")
        if kind not in ARRAYS:
            raise TokenCacheError(f"{path}: unknown cache kind {kind!r}; expected one of {list(ARRAYS)}")
        return CacheMeta(**data)
    except TokenCacheError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise TokenCacheError(f"{path} cannot be read ({type(err).__name__}: {err}): the file is damaged or cut "
                              f"short; {reencode_hint(Path(folder))}") from None


def open_array(path: Path, meta: CacheMeta | None = None) -> np.ndarray:
    """A cache's .npy file memory-mapped read-only; a missing, truncated or corrupt one is a TokenCacheError
    naming the file and the command that rebuilds the cache."""
    folder = path.parent
    if not path.is_file():
        raise TokenCacheError(f"{folder} lacks {path.name}: the cache is incomplete; {reencode_hint(folder, meta)}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        size = path.stat().st_size
        raise TokenCacheError(f"{path} is damaged or cut short ({size} bytes; numpy: {err}), e.g. by an interrupted "
                              f"copy or a full disk; {reencode_hint(folder, meta)}") from None


class CacheDataset(Dataset):
    """Samples (tokens (L,) int64 | latents (C,h,w) float32, label) from a cache folder.

    Indexed by `(index, epoch)` (as the engine's sampler does), the variant (plain or flipped) is a
    pure function of (seed, epoch, index), so resumed runs see exactly the same data; an int index
    always gives the plain variant (validation).
    """

    def __init__(self, folder: Path, seed: int = 0, random_variant: bool = True):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        name, self.item_dtype = ARRAYS[self.meta.kind]
        self.data = open_array(self.folder / name, self.meta)
        self.labels = open_array(self.folder / "labels.npy", self.meta)
        hint = reencode_hint(self.folder, self.meta)
        if self.labels.ndim != 1 or self.data.ndim < 3:
            raise TokenCacheError(f"{self.folder}: {name} has shape {self.data.shape} and labels.npy "
                                  f"{self.labels.shape}, not a {self.meta.kind} cache; {hint}")
        if len(self.data) != len(self.labels):
            raise TokenCacheError(f"{self.folder}: {len(self.data)} items but {len(self.labels)} labels; {hint}")
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
        return torch.from_numpy(x.astype(self.item_dtype)), int(self.labels[index])


def unigram_entropy(folder: Path) -> float | None:
    """Entropy (nats) of the code distribution of a token cache's plain variants, -sum_k p_k log p_k with
    p_k the frequency of code k over every position of every image; None for a latents cache.

    It is the loss of the best model that ignores context, so `unigram_entropy - AR validation loss` is
    what an AR generator gains from context: comparable between tokenizers whose codebooks are used
    unequally, where the loss alone rewards a collapsed codebook (results/crt_collapse)."""
    meta = read_meta(Path(folder))
    if meta.kind != "tokens":
        return None
    codes = open_array(Path(folder) / ARRAYS["tokens"][0], meta)[:, 0].reshape(-1)
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=int(meta.codebook_size or 0))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
