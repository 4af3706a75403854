"""A stage-2 cache held whole on the training device, batched there by index: no workers, no copies.

A token cache of an ImageNet-size dataset is small next to an accelerator's memory (1.28M images x 2
variants x 256 uint16 tokens = 1.3 GB), yet the DataLoader path reads it item by item from a memory
map, collates on the CPU and copies every batch to the device. `DeviceCacheLoader` copies the whole
(N, V, L) token array (or (N, V, C, h, w) latents) and the labels to the device once and gathers each
batch there with one indexing operation.

It is a drop-in for `ResumableLoader` over a `CacheDataset` (twostage/data/loader.py,
twostage/data/token_cache.py) with the same semantics, so a run can switch between the two and
resume either way bit for bit:

- order: `ResumableSampler.epoch_indices(epoch)` itself (permutation seeded with seed + epoch,
  DistributedSampler sharding and padding), cut into `batch_size` batches (drop_last as given);
- variant (plain or flipped) of each item: `CacheDataset.variant(index, epoch)`, the same integer
  hash of (dataset seed, epoch, index), evaluated on the device for the whole batch;
- items as the dataset returns them (tokens int64, latents float32) and batches as the default
  collate makes them: `[data (B, ...), labels (B,) int64]`;
- position: `state_dict()` / `load_state_dict()` give and take the same two integers
  {"epoch", "batch_in_epoch"}, including `strict=False`.

    if device_cache_fits(dataset, device):
        loader = DeviceCacheLoader(dataset, batch_size=per_rank, seed=seed, device=device,
                                   rank=world.rank, world_size=world.size)
    else:
        loader = ResumableLoader(dataset, batch_size=per_rank, seed=seed, num_workers=4, ...)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from twostage.data.errors import DataError
from twostage.data.loader import LoaderPosition, ResumableSampler, batches_per_epoch


__all__ = ["DeviceCacheLoader", "device_cache_bytes", "device_cache_fits"]

_MASK32 = 0xFFFFFFFF
_CHUNK_BYTES = 64 << 20  # host -> device copy in pieces of this size (the memory map is read once)


def _storage(array: np.ndarray) -> tuple[np.dtype, bool]:
    """(dtype the array is held in on the device, whether it is uint16 held as int16 bits).
    uint16 token ids are kept as int16 bits (half the memory of int32; indexing uint16 tensors is not
    supported on every device) and widened with a 0xFFFF mask when gathered."""
    if array.dtype == np.uint16:
        return np.dtype(np.int16), True
    return array.dtype, False


def device_cache_bytes(dataset) -> int:
    """Bytes the dataset's arrays take on the device (data in its storage dtype + int64 labels)."""
    dtype, _ = _storage(dataset.data)
    return int(dataset.data.size) * dtype.itemsize + len(dataset.labels) * 8


def device_cache_fits(dataset, device: str | torch.device, fraction: float = 0.25) -> bool:
    """Whether the cache takes at most `fraction` of the device's free memory (CUDA: mem_get_info;
    CPU: available physical memory), leaving the rest to the model, activations and optimizer."""
    device = torch.device(device)
    need = device_cache_bytes(dataset)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
    return need <= fraction * free


def _to_device(array: np.ndarray, dtype: np.dtype, device: torch.device) -> torch.Tensor:
    """The whole array on the device, copied in slices along the first axis."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, device=device)
    row = max(1, int(np.prod(array.shape[1:])) * dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row)
    for start in range(0, len(array), step):
        piece = np.array(array[start:start + step]).view(dtype)  # a writable copy of one slice
        out[start:start + step].copy_(torch.from_numpy(piece))
    return out


class DeviceCacheLoader(LoaderPosition):
    """Infinite per-rank batch iterator over a CacheDataset held on `device` (see the module docstring).

    dataset: a `CacheDataset` (its data, labels, seed, random_variant, variants and item_dtype are
    read; the arrays are copied once). seed: the order's seed, as ResumableLoader's `seed` (the
    variant hash uses the dataset's own seed, as the DataLoader path does).
    """

    def __init__(self, dataset, batch_size: int, *, device: str | torch.device, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int | None = None, world_size: int | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be positive")
        for attr in ("data", "labels", "variant", "item_dtype", "seed", "random_variant"):
            if not hasattr(dataset, attr):
                raise DataError(f"DeviceCacheLoader needs a CacheDataset (a {type(dataset).__name__} has no .{attr})")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.device = torch.device(device)
        self.sampler = ResumableSampler(len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed,
                                        drop_last=drop_last)
        self.batches_per_epoch = batches_per_epoch(self.sampler, batch_size, drop_last)
        dtype, self._widen16 = _storage(dataset.data)
        self.data = _to_device(dataset.data, dtype, self.device)
        self.labels = torch.from_numpy(np.asarray(dataset.labels).astype(np.int64)).to(self.device)
        self.item_dtype = torch.from_numpy(np.empty(0, dataset.item_dtype)).dtype
        self.variants = int(dataset.data.shape[1])
        self._random = bool(dataset.random_variant) and self.variants > 1
        # The index term of CacheDataset.variant's hash, once: (index * 0x9E3779B1) mod 2^32.
        index = torch.arange(len(dataset), dtype=torch.int64, device=self.device)
        self._index_hash = (index * 0x9E3779B1) & _MASK32 if self._random else None
        self._epoch, self._batch = 0, 0
        self._order: torch.Tensor | None = None  # this rank's indices of epoch self._order_epoch
        self._order_epoch = -1

    # -- iteration ----------------------------------------------------------------------------------

    def __iter__(self) -> DeviceCacheLoader:
        return self

    def _indices(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            order = self.sampler.epoch_indices(epoch)  # the very list the DataLoader path iterates
            self._order = torch.tensor(order, dtype=torch.int64, device=self.device)
            self._order_epoch = epoch
        return self._order

    def variant(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """CacheDataset.variant(i, epoch) for every i of `index`, on the device."""
        if not self._random:
            return torch.zeros_like(index)
        const = (epoch * 0x85EBCA77 + self.dataset.seed * 0xC2B2AE3D) & _MASK32  # exact in Python ints
        h = (self._index_hash[index] + const) & _MASK32
        h = h ^ (h >> 15)
        return ((h * 0x2C1B3C6D) & _MASK32) % self.variants  # h < 2^32, the factor < 2^30: no overflow

    def batch(self, epoch: int, batch: int) -> list[torch.Tensor]:
        """Batch `batch` of `epoch` (what the DataLoader path yields there), gathered on the device."""
        order = self._indices(epoch)
        index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        x = self.data[index, self.variant(index, epoch)]
        if self._widen16:
            x = x.to(torch.int32) & 0xFFFF
        return [x.to(self.item_dtype), self.labels[index]]

    def __next__(self) -> list[torch.Tensor]:
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        out = self.batch(self._epoch, self._batch)
        self._batch += 1
        return out

    def close(self) -> None:
        """Free the device copies."""
        self.data = self.labels = self._order = self._index_hash = None
        self._order_epoch = -1

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "bytes": device_cache_bytes(self.dataset), "items": len(self.dataset),
                "variants": self.variants, "batches_per_epoch": self.batches_per_epoch}
