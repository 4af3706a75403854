"""The one writer of stage-2 caches (format: twostage/data/token_cache.py), used by every encoder.

    with CacheWriter(out, kind="latents", num_items=n, variants=2, item_shape=(d, h, w),
                     dtype=np.float16, channel_stats=True) as writer:
        for codes, labels in batches:            # codes (B, V, *item_shape), on any device
            writer.add(codes, labels)
        writer.finish(meta)                      # the folder appears complete, or not at all

Codes stream into a memory-mapped array inside a hidden temporary folder, so an ImageNet-size cache
needs no RAM; `finish` writes labels and meta.json and renames the folder into place. Leaving the
`with` block without `finish` (an error, a kill) removes the temporary folder and leaves any older
cache at `out` untouched.

With `channel_stats`, the per-channel mean / std of what is stored (after rounding to the storage
dtype, accumulated in float64 on the codes' device) go into meta.json: a flow generator trains on
latents normalized by them (LightningDiT normalizes per channel; arXiv:2501.01423).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from twostage.data.token_cache import ARRAYS, CacheMeta, TokenCacheError


class CacheWriter:
    def __init__(self, out: str | Path, *, kind: str, num_items: int, variants: int, item_shape: tuple[int, ...],
                 dtype: np.dtype | type, overwrite: bool = False, channel_stats: bool = False) -> None:
        if kind not in ARRAYS:
            raise TokenCacheError(f"unknown cache kind {kind!r}; expected one of {list(ARRAYS)}")
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite (--overwrite) to replace it")
        self.kind, self.num_items, self.variants = kind, num_items, variants
        self.item_shape, self.dtype = tuple(item_shape), np.dtype(dtype)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.array = np.lib.format.open_memmap(self.tmp / ARRAYS[kind][0], mode="w+", dtype=self.dtype,
                                               shape=(num_items, variants, *self.item_shape))
        self.labels = np.zeros(num_items, dtype=np.int64)
        self.done = 0
        self.channel_stats = channel_stats
        self._sum: torch.Tensor | None = None
        self._sum_sq: torch.Tensor | None = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp.exists():  # not finished: leave nothing half-written behind
            self.array = None
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, codes: torch.Tensor, labels) -> None:
        """Append a batch: codes (B, V, *item_shape), labels (B,). One device->host copy."""
        b = codes.shape[0]
        if tuple(codes.shape[1:]) != (self.variants, *self.item_shape):
            raise ValueError(f"codes must be (B, {self.variants}, {', '.join(map(str, self.item_shape))}), "
                             f"got {tuple(codes.shape)}")
        if self.done + b > self.num_items:
            raise ValueError(f"more items than the {self.num_items} the cache was opened for")
        stored = codes.to(_torch_dtype(self.dtype)) if codes.is_floating_point() else codes
        if self.channel_stats:
            # (B, V, C, ...) -> (C, everything else): statistics of exactly what is stored
            per_channel = stored.double().transpose(0, 2).reshape(stored.shape[2], -1)
            s, s2 = per_channel.sum(1), per_channel.pow(2).sum(1)
            self._sum = s if self._sum is None else self._sum + s
            self._sum_sq = s2 if self._sum_sq is None else self._sum_sq + s2
        self.array[self.done : self.done + b] = stored.cpu().numpy().astype(self.dtype, copy=False)
        self.labels[self.done : self.done + b] = np.asarray(labels, dtype=np.int64)
        self.done += b

    def finish(self, meta: CacheMeta) -> Path:
        """Write labels and meta.json (with channel statistics, when kept) and move the folder into place."""
        if self.done != self.num_items:
            raise RuntimeError(f"the cache was opened for {self.num_items} items but {self.done} were added")
        if meta.kind != self.kind:
            raise ValueError(f"meta.kind={meta.kind!r} but the writer holds {self.kind!r}")
        self.array.flush()
        self.array = None
        if self.channel_stats and self._sum is not None:
            count = float(self.num_items * self.variants * int(np.prod(self.item_shape[1:])))
            mean = self._sum / count
            std = (self._sum_sq / count - mean.pow(2)).clamp_min(0).sqrt()
            meta.latent_mean, meta.latent_std = mean.tolist(), std.tolist()
        np.save(self.tmp / "labels.npy", self.labels)
        (self.tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, self.out)
        return self.out


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def write_arrays(out: str | Path, meta: CacheMeta, codes: np.ndarray, labels: np.ndarray, *,
                 dtype: np.dtype | type | None = None, overwrite: bool = False) -> Path:
    """A whole cache from in-memory arrays (N, V, *item_shape) in one call: small data and tests."""
    codes = np.asarray(codes)
    floating = np.issubdtype(codes.dtype, np.floating)
    dtype = np.dtype(dtype or (np.float16 if floating else codes.dtype))
    with CacheWriter(out, kind=meta.kind, num_items=len(codes), variants=codes.shape[1], item_shape=codes.shape[2:],
                     dtype=dtype, overwrite=overwrite, channel_stats=floating and meta.latent_mean is None) as writer:
        writer.add(torch.from_numpy(codes), labels)
        return writer.finish(meta)


__all__ = ["CacheWriter", "write_arrays"]
