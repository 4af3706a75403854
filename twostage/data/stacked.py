"""Data for K replicas of one model trained together (stacked parameters, torch.func.vmap).

Each replica is meant to see exactly the data of a separate run with its own train.seed: the same
order (the loader's seed) and the same random variant of every item (a CacheDataset's seed). So
replicas are not batched from one shared loader; `StackedLoader` runs K ordinary loaders, one per
replica and seed, and stacks their batches along a new leading axis:

    data = StackedDatasets([CacheDataset(cache, seed=s) for s in seeds], seeds)
    loader = build_loader(data, batch_size=per_rank, ...)   # twostage/data/train_loader.py
    tokens, labels = next(loader)                            # (K, B, L), (K, B)

A StackedLoader's position is the list of its loaders' positions, so it resumes exactly whenever
each of them does (ResumableLoader and DeviceCacheLoader both do, bit for bit).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from twostage.config import ConfigError
from twostage.data.errors import DataError
from twostage.data.token_cache import CacheDataset

__all__ = ["StackedDatasets", "StackedLoader"]


def _signature(item: Any) -> Any:
    """What must agree between replicas for their batches to stack: the structure of an item with the
    shape and dtype of each tensor leaf (other leaves, e.g. int labels, by type)."""
    if isinstance(item, torch.Tensor):
        return (tuple(item.shape), item.dtype)
    if isinstance(item, dict):
        return {k: _signature(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [_signature(v) for v in item]
    return type(item).__name__


def _name(dataset: Any) -> str:
    folder = getattr(dataset, "folder", None)
    return f"{type(dataset).__name__}({folder})" if folder is not None else type(dataset).__name__


class StackedDatasets:
    """One dataset per replica and the replica's train.seed (see the module docstring).

    The datasets may be different caches (e.g. of different tokenizers), but their items must stack:
    equal length and equal item structure, shapes and dtypes. A CacheDataset must have been opened with
    its replica's seed, since that seed picks its random variants in a separate run. A mismatch is a
    ConfigError (a ValueError) naming the replica.
    """

    def __init__(self, datasets: Sequence[Any], seeds: Sequence[int]):
        self.datasets, self.seeds = list(datasets), [int(s) for s in seeds]
        if not self.datasets:
            raise ConfigError("StackedDatasets needs at least one replica (got no datasets)")
        if len(self.datasets) != len(self.seeds):
            raise ConfigError(f"StackedDatasets got {len(self.datasets)} datasets but {len(self.seeds)} seeds; "
                              "give one seed per replica")
        first, length = _signature(self.datasets[0][0]), len(self.datasets[0])
        for i, (dataset, seed) in enumerate(zip(self.datasets, self.seeds)):
            if isinstance(dataset, CacheDataset) and dataset.seed != seed:
                raise ConfigError(f"replica {i}: {_name(dataset)} was opened with seed {dataset.seed} but the "
                                  f"replica's seed is {seed}; open it as CacheDataset(folder, seed={seed}) so its "
                                  "variants are those of a separate run")
            if i == 0:
                continue
            if len(dataset) != length:
                raise ConfigError(f"replica {i}: {_name(dataset)} has {len(dataset)} items, replica 0 "
                                  f"({_name(self.datasets[0])}) has {length}; stacked replicas need equal lengths")
            signature = _signature(dataset[0])
            if signature != first:
                raise ConfigError(f"replica {i}: {_name(dataset)} has items {signature}, replica 0 "
                                  f"({_name(self.datasets[0])}) has {first}; stacked replicas need items of one "
                                  "structure, shape and dtype")

    @property
    def replicas(self) -> int:
        return len(self.datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])


def stack_batches(batches: Sequence[Any]) -> Any:
    """`torch.stack` of every tensor leaf of K batches of one structure (lists, tuples, dicts)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(batches))
    if isinstance(first, dict):
        return {k: stack_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        if any(len(b) != len(first) for b in batches):
            raise DataError(f"replica batches differ in structure: lengths {[len(b) for b in batches]}")
        return type(first)(stack_batches(parts) for parts in zip(*batches))
    raise DataError(f"cannot stack replica batches holding a {type(first).__name__}; a batch must be tensors "
                    "in lists, tuples or dicts")


class StackedLoader:
    """K loaders (one per replica, each with its replica's seed) iterated in step; every batch is the
    K loaders' batches at that position, stacked along a new leading axis (K, ...)."""

    def __init__(self, loaders: Sequence[Any]):
        self.loaders = list(loaders)
        if not self.loaders:
            raise DataError("StackedLoader needs at least one loader")

    @property
    def replicas(self) -> int:
        return len(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> StackedLoader:
        return self

    def __next__(self) -> Any:
        return stack_batches([next(loader) for loader in self.loaders])

    def state_dict(self) -> dict[str, list[dict[str, int]]]:
        return {"replicas": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore every replica's position (a single loader's state, or another K, is an error)."""
        replicas = state.get("replicas") if isinstance(state, dict) else None
        if not isinstance(replicas, list):
            raise DataError(f"a stacked loader state is {{'replicas': [one position per replica]}}, got {state!r}")
        if len(replicas) != self.replicas:
            raise DataError(f"the saved loader state has {len(replicas)} replica(s) but this loader has "
                            f"{self.replicas}; the number of replicas cannot change on resume")
        for loader, position in zip(self.loaders, replicas):
            loader.load_state_dict(position, strict=strict)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()
