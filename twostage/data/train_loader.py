"""The training loader the engine uses: one choice among the loaders, so every run resumes from any other's
position (they yield the same batches from the same positions; the choice changes speed, never the run).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from twostage.config import ConfigError
from twostage.data.device_cache import DeviceCacheLoader, device_cache_fits
from twostage.data.loader import ResumableLoader
from twostage.data.stacked import StackedDatasets, StackedLoader
from twostage.data.token_cache import CacheDataset


def build_loader(
    dataset: Dataset | StackedDatasets,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    device: str | torch.device,
    rank: int | None,
    world_size: int | None,
    on_device: bool | None = None,
) -> ResumableLoader | DeviceCacheLoader | StackedLoader:
    """The training loader of the engine: one choice, so every run resumes from any other's position.

    A stage-2 cache (CacheDataset) on a CUDA device is held and batched on the device
    (`DeviceCacheLoader`) when on_device is True, or None and it fits next to the model
    (`device_cache_fits`); anything else goes through the DataLoader (`ResumableLoader`). Both yield the
    same batches from the same positions, so the choice changes speed, never the run. A StackedDatasets
    gets one such loader per replica, seeded with the replica's seed (`seed` is not used), in a
    StackedLoader.
    """
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, rank=rank, world_size=world_size,
                  on_device=on_device)
    if isinstance(dataset, StackedDatasets):
        return StackedLoader([build_loader(d, seed=s, **common) for d, s in zip(dataset.datasets, dataset.seeds)])
    device = torch.device(device)
    cache_on_cuda = isinstance(dataset, CacheDataset) and device.type == "cuda"
    if on_device is True and not cache_on_cuda:
        raise ConfigError(f"train.data_on_device=true needs a token/latent cache on a CUDA device, but this run trains "
                          f"on a {type(dataset).__name__} on {device}; use train.data_on_device=null (auto) or false")
    if cache_on_cuda and (on_device is True or (on_device is None and device_cache_fits(dataset, device))):
        return DeviceCacheLoader(dataset, batch_size, seed=seed, device=device, rank=rank, world_size=world_size)
    return ResumableLoader(dataset, batch_size, seed=seed, num_workers=num_workers,
                           pin_memory=device.type == "cuda", rank=rank, world_size=world_size)


__all__ = ["build_loader"]
