"""DeviceCacheLoader yields exactly the batches of the DataLoader path (ResumableLoader over a
CacheDataset) for a seed and epoch, across epochs, ranks, variants and cache kinds, and resumes
mid-epoch identically, from its own position or from a ResumableLoader's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twostage.data import DataError, ResumableLoader
from twostage.data.cache_writer import write_arrays
from twostage.data.device_cache import DeviceCacheLoader, device_cache_bytes, device_cache_fits
from twostage.data.token_cache import CacheDataset, CacheMeta

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def token_cache(folder, n=53, codebook=60000, variants=2, seed=0):
    """uint16 tokens up to 60000 (above int16's range: the int16-bits storage must widen them back)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, codebook, (n, variants, 6)).astype(np.uint16)
    meta = CacheMeta(kind="tokens", grid=(2, 3), num_classes=5, tokenizer_run="/nonexistent", tokenizer_checksum="x",
                     split="train", codebook_size=codebook, image_size=8)
    return write_arrays(folder, meta, codes, rng.integers(0, 5, n))


def latent_cache(folder, n=41, seed=1):
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((n, 2, 3, 2, 2)).astype(np.float32)
    meta = CacheMeta(kind="latents", grid=(2, 2), num_classes=4, tokenizer_run="/nonexistent", tokenizer_checksum="x",
                     split="train", channels=3, image_size=8)
    return write_arrays(folder, meta, codes, rng.integers(0, 4, n))


def take(loader, k):
    return [next(loader) for _ in range(k)]


def same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert isinstance(x, list) and isinstance(y, list) and len(x) == len(y) == 2, i
        for u, v in zip(x, y):
            assert u.dtype == v.dtype and u.shape == v.shape, (i, u.dtype, v.dtype, u.shape, v.shape)
            assert torch.equal(u.cpu(), v.cpu()), i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["tokens", "latents"])
@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
def test_same_batches_as_the_dataloader_path(tmp_path, device, kind, seed):
    folder = token_cache(tmp_path / "c") if kind == "tokens" else latent_cache(tmp_path / "c")
    ds = CacheDataset(folder, seed=seed)
    ref = ResumableLoader(ds, batch_size=8, seed=seed)
    ours = DeviceCacheLoader(ds, batch_size=8, seed=seed, device=device)
    assert len(ours) == len(ref)
    k = 3 * len(ref) + 2  # three epoch boundaries
    expected, got = take(ref, k), take(ours, k)
    same(expected, got)
    assert all(b[0].device.type == torch.device(device).type for b in got)
    assert ours.state_dict() == ref.state_dict()
    # both variants occur, and an item's variant changes between epochs (the flip augmentation works)
    variants = {ds.variant(i, e) for i in range(len(ds)) for e in range(3)}
    assert variants == {0, 1}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world,drop_last,shuffle", [(3, True, True), (3, False, True), (2, False, False)])
def test_ranks_padding_and_order_options(tmp_path, device, world, drop_last, shuffle):
    ds = CacheDataset(token_cache(tmp_path / "c"), seed=3)
    for rank in range(world):
        ref = ResumableLoader(ds, batch_size=5, seed=11, rank=rank, world_size=world, drop_last=drop_last,
                              shuffle=shuffle)
        ours = DeviceCacheLoader(ds, batch_size=5, seed=11, rank=rank, world_size=world, drop_last=drop_last,
                                 shuffle=shuffle, device=device)
        k = 2 * len(ref) + 1
        same(take(ref, k), take(ours, k))


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_variant_and_one_variant_caches(tmp_path, device):
    plain = CacheDataset(token_cache(tmp_path / "a"), random_variant=False)  # as a validation cache is opened
    one = CacheDataset(token_cache(tmp_path / "b", variants=1), seed=4)
    for ds in (plain, one):
        same(take(ResumableLoader(ds, batch_size=4, seed=2), 30),
             take(DeviceCacheLoader(ds, batch_size=4, seed=2, device=device), 30))


@pytest.mark.parametrize("device", DEVICES)
def test_resume_mid_epoch_is_exact(tmp_path, device):
    ds = CacheDataset(token_cache(tmp_path / "c"), seed=5)  # 53 items, batch 8: 6 batches per epoch
    reference = take(ResumableLoader(ds, batch_size=8, seed=5), 20)
    for cut in (3, 6, 7, 13):
        first = DeviceCacheLoader(ds, batch_size=8, seed=5, device=device)
        head = take(first, cut)
        state = first.state_dict()
        if cut == 3:
            assert state == {"epoch": 0, "batch_in_epoch": 3}
        if cut == 6:
            assert state == {"epoch": 1, "batch_in_epoch": 0}
        second = DeviceCacheLoader(ds, batch_size=8, seed=5, device=device)
        second.load_state_dict(dict(state))
        same(head + take(second, 20 - cut), reference)
    # a DataLoader run's checkpoint resumes on the device loader, and the other way round
    ref_first = ResumableLoader(ds, batch_size=8, seed=5)
    head = take(ref_first, 9)
    dev = DeviceCacheLoader(ds, batch_size=8, seed=5, device=device)
    dev.load_state_dict(ref_first.state_dict())
    same(head + take(dev, 4), reference[:13])
    back = ResumableLoader(ds, batch_size=8, seed=5)
    back.load_state_dict(dev.state_dict())
    same(take(back, 7), reference[13:20])


def test_positions_are_checked_like_the_dataloader_path(tmp_path):
    ds = CacheDataset(token_cache(tmp_path / "c"))
    loader = DeviceCacheLoader(ds, batch_size=8, device="cpu")
    with pytest.raises(DataError, match="does not fit"):
        loader.load_state_dict({"epoch": 0, "batch_in_epoch": 99})
    with pytest.raises(DataError, match="integer"):
        loader.load_state_dict({"epoch": 0})
    loader.load_state_dict({"epoch": 2, "batch_in_epoch": 99}, strict=False)
    assert loader.state_dict() == {"epoch": 3, "batch_in_epoch": 0}
    with pytest.raises(DataError, match="fewer than one batch"):
        DeviceCacheLoader(ds, batch_size=100, device="cpu")
    with pytest.raises(DataError, match="CacheDataset"):
        DeviceCacheLoader(list(range(10)), batch_size=2, device="cpu")


def test_size_and_fit(tmp_path):
    ds = CacheDataset(token_cache(tmp_path / "c", n=53))
    assert device_cache_bytes(ds) == 53 * 2 * 6 * 2 + 53 * 8  # uint16 held as int16 bits, int64 labels
    assert device_cache_fits(ds, "cpu")
    assert not device_cache_fits(ds, "cpu", fraction=0.0)
