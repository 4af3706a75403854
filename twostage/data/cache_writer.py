"""The one writer of stage-2 caches (format: twostage/data/token_cache.py), used by every encoder.

    with CacheWriter(out, kind="latents", num_items=n, variants=2, item_shape=(d, h, w),
                     dtype=np.float16, channel_stats=True) as writer:
        for codes, labels in batches:            # codes (B, V, *item_shape), on any device
            writer.add(codes, labels)
        writer.finish(meta)                      # the folder appears complete, or not at all

Codes stream into a memory-mapped array inside a hidden temporary folder, so an ImageNet-size cache
needs no RAM; `finish` writes labels and meta.json and renames the folder into place. Leaving the
`with` block without `finish` (an error) removes the temporary folder and leaves any older cache at
`out` untouched. A killed writer cannot clean up: its temporary folder (named after the host and the
process) is removed by the next writer of the same cache once that process is gone. The array's disk
space is reserved up front, so a full disk is a clear error before any encoding, not a crash (SIGBUS)
halfway through a memory-mapped write; any other write that fails for lack of space says so too.

With `channel_stats`, the per-channel mean / std of what is stored (after rounding to the storage
dtype, accumulated in float64 on the codes' device) go into meta.json: a flow generator trains on
latents normalized by them (LightningDiT normalizes per channel; arXiv:2501.01423).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
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
        _remove_stale(self.out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite (--overwrite) to replace it")
        self.kind, self.num_items, self.variants = kind, num_items, variants
        self.item_shape, self.dtype = tuple(item_shape), np.dtype(dtype)
        self.overwrite = overwrite
        self.tmp = _scratch(self.out, "tmp", os.getpid())
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.array = None
        try:
            self.tmp.mkdir(parents=True)
            path = self.tmp / ARRAYS[kind][0]
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype,
                                                   shape=(num_items, variants, *self.item_shape))
            _reserve(path)
        except BaseException as err:
            self.array = None
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._raise_if_disk_full(err, "reserving space for")
            raise
        self.labels = np.zeros(num_items, dtype=np.int64)
        self.done = 0
        self.channel_stats = channel_stats
        self._sum: torch.Tensor | None = None
        self._sum_sq: torch.Tensor | None = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not finished: leave nothing half-written behind
            self.array = None
            shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None:
            self._raise_if_disk_full(exc, "writing")

    def _raise_if_disk_full(self, err: BaseException, doing: str) -> None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            size = self.num_items * self.variants * int(np.prod(self.item_shape)) * self.dtype.itemsize / 2**20
            kept = ("the cache already there is unchanged" if self.out.exists() else "nothing was left behind")
            raise TokenCacheError(f"no space left on the device of {self.out} while {doing} the cache "
                                  f"({err.strerror or err}); {kept}. Free about {size:.0f} MB and run the "
                                  "command again") from err

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
        for f in self.tmp.iterdir():  # on disk before the folder is renamed into place
            _fsync(f)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out} appeared while it was being encoded; pass overwrite "
                                      "(--overwrite) to replace it")
            # Moved aside, not deleted, until the new cache is in place: a kill between the two renames
            # leaves the old cache under its scratch name, and the next writer puts it back.
            old = _scratch(self.out, "old", os.getpid())
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def _scratch(out: Path, what: str, pid: int) -> Path:
    """A hidden sibling of `out` owned by one process of one host: `.NAME.tmp-HOST-PID` / `.NAME.old-...`."""
    return out.with_name(f".{out.name}.{what}-{socket.gethostname()}-{pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Clear what killed writers of `out` on this host left: temporary folders are removed; an old cache
    moved aside by a writer killed between its two renames is put back when `out` is missing."""
    prefix = f".{out.name}."
    host = socket.gethostname()
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(f"{glob.escape(prefix)}*")):
        what, _, owner = path.name[len(prefix):].partition("-")
        owner_host, _, pid = owner.rpartition("-")
        if what not in ("tmp", "old") or owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue  # another host's, a live writer's, or not ours at all
        if what == "old" and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _reserve(path: Path) -> None:
    """Allocate the whole file now (ENOSPC here, not SIGBUS inside a memory-mapped write later)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            fallocate(fh.fileno(), 0, size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # a file system without allocation support: the space is found (or not) while writing


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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
