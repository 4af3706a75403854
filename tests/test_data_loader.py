"""ResumableSampler sharding and exact resume of ResumableLoader (with and without workers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from twostage.data import ArrayDataset, DataError, ImageTransform, ResumableLoader, ResumableSampler, eval_loader


@pytest.mark.parametrize("n,world,drop_last,shuffle", [(103, 4, False, True), (103, 4, True, True), (100, 3, False, False)])
def test_sampler_matches_distributed_sampler(n, world, drop_last, shuffle):
    shards = []
    for rank in range(world):
        ours = ResumableSampler(n, rank=rank, world_size=world, shuffle=shuffle, seed=7, drop_last=drop_last)
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=7, drop_last=drop_last)
        ours.set_epoch(2)
        ref.set_epoch(2)
        pairs = list(ours)
        assert [i for i, _ in pairs] == list(ref) and all(e == 2 for _, e in pairs)
        shards.append([i for i, _ in pairs])
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1  # every rank the same number of samples
    flat = [i for s in shards for i in s]
    if drop_last:  # disjoint, covering all but the n % world trimmed ones
        assert len(set(flat)) == len(flat) == n - n % world
    else:  # covering; the only repeats are the padding
        assert set(flat) == set(range(n)) and len(flat) - n == (-n) % world


def test_sampler_starts_mid_epoch():
    s = ResumableSampler(20, rank=1, world_size=2, seed=0)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=4)
    assert list(s) == full[4:] and len(s) == 6


def _dataset(n=50):
    images = np.random.default_rng(1).integers(0, 256, (n, 12, 10), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n) % 10, ImageTransform(image_size=12, channels=1, flip=True, seed=5))


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_resume_is_exact_without_workers():
    ds = _dataset()
    ref_loader = ResumableLoader(ds, batch_size=4, seed=3)  # 12 batches per epoch (2 samples dropped)
    assert len(ref_loader) == 12
    reference = _take(ref_loader, 30)  # crosses two epoch boundaries
    for cut in (5, 12, 13, 23):
        first = ResumableLoader(ds, batch_size=4, seed=3)
        head = _take(first, cut)
        state = first.state_dict()
        if cut == 12:
            assert state == {"epoch": 1, "batch_in_epoch": 0}
        if cut == 5:
            assert state == {"epoch": 0, "batch_in_epoch": 5}
        second = ResumableLoader(ds, batch_size=4, seed=3)
        second.load_state_dict(dict(state))
        assert _equal(head + _take(second, 30 - cut), reference), cut
    assert not torch.equal(reference[0][0], reference[12][0])  # epochs differ in order (and flips)


def test_resume_is_exact_with_two_workers_and_independent_of_worker_count():
    ds = _dataset()
    reference = _take(ResumableLoader(ds, batch_size=4, seed=3), 20)
    first = ResumableLoader(ds, batch_size=4, seed=3, num_workers=2)
    head = _take(first, 7)  # mid-epoch, with batches already prefetched by the workers
    state = first.state_dict()
    head += _take(first, 6)  # keeps going across the epoch boundary
    assert _equal(head, reference[:13])
    boundary = first.state_dict()
    first.close()
    second = ResumableLoader(ds, batch_size=4, seed=3, num_workers=2)
    second.load_state_dict(state)
    assert _equal(_take(second, 13), reference[7:20])
    second.load_state_dict(boundary)  # re-positioning a live loader drops its prefetched batches
    assert boundary == {"epoch": 1, "batch_in_epoch": 1} and _equal(_take(second, 7), reference[13:20])
    second.close()


def test_loader_leaves_global_rng_alone_and_checks_state():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = ResumableLoader(_dataset(), batch_size=8, seed=0)
    _take(loader, 10)
    assert torch.equal(before, torch.get_rng_state())
    with pytest.raises(DataError, match="batches per epoch"):
        loader.load_state_dict({"epoch": 0, "batch_in_epoch": 99})
    loader.load_state_dict({"epoch": 2, "batch_in_epoch": 99}, strict=False)  # another world size: next epoch
    assert loader.state_dict() == {"epoch": 3, "batch_in_epoch": 0}
    with pytest.raises(DataError, match="batch_in_epoch"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="fewer than one batch"):
        ResumableLoader(_dataset(10), batch_size=4, rank=0, world_size=4)


def test_eval_loader_shards_disjoint_and_complete():
    ds = _dataset(23)
    seen = []
    for rank in range(3):
        for _, labels in eval_loader(ds, batch_size=4, rank=rank, world_size=3):
            seen.extend(labels.tolist())
    assert sorted(seen) == sorted((np.arange(23) % 10).tolist())
