"""Resumable, data-parallel batch loading: exact resume, bit for bit, with or without workers.

`ResumableSampler` shards and shuffles like torch's DistributedSampler (permutation seeded with
seed + epoch, padded or trimmed to a multiple of the world size, then every world_size-th index from
rank) and yields `(index, epoch)` pairs, so a dataset can key its augmentation on the epoch without
any per-worker RNG. It can start in the middle of an epoch.

`ResumableLoader` is an infinite iterator over per-rank batches across epochs on top of a torch
DataLoader (workers, pinned memory, prefetch). Its position is two integers, {"epoch",
"batch_in_epoch"}: the batches already handed to the caller. Because a sample's pixels depend only
on (dataset, seed, epoch, index), restarting the sampler at batch_in_epoch * batch_size of that
epoch reproduces every later batch exactly, regardless of the number of workers or of what the
previous process had prefetched.

    loader = ResumableLoader(dataset, batch_size=per_rank, seed=seed, num_workers=4,
                             rank=world.rank, world_size=world.size)
    batch = next(loader)                      # forever; epochs roll over by themselves
    state = loader.state_dict()               # save with the checkpoint
    loader.load_state_dict(state)             # after rebuilding it the same way

The engine picks between this loader, the GPU-resident `DeviceCacheLoader` for stage-2 caches and a
`StackedLoader` of either for K replicas in one place: train_loader.py `build_loader`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from twostage.data.errors import DataError

log = logging.getLogger(__name__)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world, else torch.distributed's when initialized, else a single process."""
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    return rank, world_size


class ResumableSampler(Sampler[tuple[int, int]]):
    """DistributedSampler semantics, yielding (index, epoch) pairs, startable mid-epoch."""

    def __init__(
        self,
        size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.size = int(size)
        self.rank, self.world_size = _world(rank, world_size)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if drop_last:  # trim the tail so every rank has the same number of distinct samples
            self.num_samples = self.size // self.world_size
        else:  # pad by repeating the start of the permutation
            self.num_samples = -(-self.size // self.world_size)
        if self.num_samples == 0:
            raise DataError(f"{self.size} samples cannot be split over {self.world_size} ranks")
        self.total_size = self.num_samples * self.world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use `epoch`'s order and skip its first `start` samples (of this rank)."""
        if not 0 <= start <= self.num_samples:
            raise DataError(f"start={start} is outside this rank's {self.num_samples} samples per epoch")
        self.epoch, self.start = int(epoch), int(start)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for a whole epoch, in order."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.size, generator=g).tolist()
        else:
            indices = list(range(self.size))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            pad = self.total_size - len(indices)
            while pad > 0:
                indices += indices[:pad]
                pad = self.total_size - len(indices)
        return indices[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.epoch_indices(epoch)[self.start :]:
            yield index, epoch

    def __len__(self) -> int:
        return self.num_samples - self.start


def batches_per_epoch(sampler: ResumableSampler, batch_size: int, drop_last: bool) -> int:
    """Batches of one rank per epoch; a rank with less than one batch is the user's error."""
    per_rank = sampler.num_samples
    n = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    if n == 0:
        raise DataError(
            f"each of the {sampler.world_size} rank(s) gets {per_rank} samples per epoch, fewer than "
            f"one batch of {batch_size}; use a smaller batch or more data"
        )
    return n


class LoaderPosition:
    """The resumable position of a loader that yields `batches_per_epoch` batches per epoch: what a
    checkpoint saves ({"epoch", "batch_in_epoch"}) and how a resume restores it. Shared by the
    DataLoader-based `ResumableLoader` and the GPU-resident `DeviceCacheLoader` (device_cache.py), so a
    run can switch between them and still resume exactly."""

    batches_per_epoch: int
    _epoch: int
    _batch: int

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- position -----------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    def state_dict(self) -> dict[str, int]:
        """The position: batches of `epoch` already returned by next(). A finished epoch reads as the next one at 0."""
        if self._batch >= self.batches_per_epoch:
            return {"epoch": self._epoch + 1, "batch_in_epoch": 0}
        return {"epoch": self._epoch, "batch_in_epoch": self._batch}

    def load_state_dict(self, state: dict[str, int], strict: bool = True) -> None:
        """Continue from a saved position; the next batch is the one after the last one returned.

        strict=False accepts a position beyond this loader's epoch length (a run resumed with another
        world size or batch size, where exact resume is impossible anyway) by starting the next epoch.
        """
        try:
            epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"a loader state needs integer 'epoch' and 'batch_in_epoch', got {state!r}") from None
        if not strict and epoch >= 0 and batch > self.batches_per_epoch:
            log.warning("saved position batch %d of epoch %d is past this loader's %d batches per epoch; "
                        "continuing with epoch %d", batch, epoch, self.batches_per_epoch, epoch + 1)  # fmt: skip
            epoch, batch = epoch + 1, 0
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise DataError(
                f"saved loader position epoch={epoch}, batch_in_epoch={batch} does not fit this loader's "
                f"{self.batches_per_epoch} batches per epoch: the dataset, batch size or world size changed"
            )
        self._epoch, self._batch = epoch, batch
        self._moved()


    def _moved(self) -> None:
        """Called after the position changed (a loader drops batches it prefetched for the old one)."""


class ResumableLoader(LoaderPosition):
    """Infinite per-rank batch iterator with an exact, two-integer position (see module docstring).

    `batch_size` is per rank (the caller divides the global batch). drop_last=True (the default for
    training) gives every rank the same number of full batches per epoch. Workers are persistent by
    default: re-forking them every epoch costs seconds per epoch on small datasets and buys nothing,
    since they keep no state that matters (all randomness is keyed on (seed, epoch, index)).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        multiprocessing_context: str | None = None,
        timeout: float = 0.0,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be positive")
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = ResumableSampler(
            len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.batches_per_epoch = batches_per_epoch(self.sampler, batch_size, drop_last)
        workers = num_workers > 0
        # A private generator for the workers' base seed: DataLoader would otherwise draw it from the
        # global torch RNG at every epoch start, shifting the training loop's random numbers.
        generator = torch.Generator()
        generator.manual_seed(seed)
        self._loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(self.sampler, batch_size, drop_last),
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=persistent_workers and workers,
            prefetch_factor=prefetch_factor if workers else None,
            multiprocessing_context=multiprocessing_context if workers else None,
            timeout=timeout,
            generator=generator,
        )
        self._epoch, self._batch = 0, 0
        self._it: Iterator[Any] | None = None

    # -- iteration ----------------------------------------------------------------------------------

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> Any:
        if self._batch >= self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        if self._it is None:
            self.sampler.set_epoch(self._epoch, start=self._batch * self.batch_size)
            self._it = iter(self._loader)
        try:
            batch = next(self._it)
        except StopIteration:  # cannot happen unless the dataset changed length under us
            raise DataError(
                f"the data loader ran dry at batch {self._batch} of epoch {self._epoch} "
                f"(expected {self.batches_per_epoch}); did the dataset change size?"
            ) from None
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._it = None  # the epoch is done; the next call starts the next one
            self._report()
        return batch

    def _report(self) -> None:
        """Let the dataset report files it skipped (found in this process or in its workers)."""
        report = getattr(self.dataset, "report_skipped", None)
        if callable(report):
            report()

    def _moved(self) -> None:
        self._it = None  # any prefetched batches belong to the old position

    def close(self) -> None:
        """Stop the workers now (they also stop when the loader is garbage collected)."""
        self._it = None
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None
        self._report()


class ShardSampler(Sampler[int]):
    """Rank r of w gets indices r, r + w, r + 2w, ... in order, with no padding (for evaluation)."""

    def __init__(self, size: int, *, rank: int | None = None, world_size: int | None = None):
        self.size = int(size)
        self.rank, self.world_size = _world(rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """One ordered pass over this rank's shard, no augmentation (int keys), last batch kept.

    The shards are disjoint and cover the dataset exactly once, so per-rank statistics can simply
    be gathered (no duplicates from DistributedSampler's padding skew the count).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank=rank, world_size=world_size),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        collate_fn=collate_fn,
    )


__all__ = ["LoaderPosition", "ResumableLoader", "ResumableSampler", "ShardSampler", "eval_loader"]
