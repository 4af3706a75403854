"""K replicas trained together see exactly the data of K separate runs: a StackedLoader's batches are the
stacked batches of one loader per replica seed, it resumes exactly (also across the DataLoader / device
loader switch), StackedDatasets refuses replicas that cannot stack, and build_loader picks the loader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_device_cache import latent_cache, same, take, token_cache  # noqa: E402

from twostage.config import ConfigError, from_dict  # noqa: E402
from twostage.data import DataError, ResumableLoader  # noqa: E402
from twostage.data.device_cache import DeviceCacheLoader  # noqa: E402
from twostage.data.train_loader import build_loader  # noqa: E402
from twostage.data.stacked import StackedDatasets, StackedLoader, stack_batches  # noqa: E402
from twostage.data.token_cache import CacheDataset  # noqa: E402
from twostage.engine.config import TrainConfig  # noqa: E402

SEEDS = (3, 5)
CPU = dict(batch_size=8, num_workers=0, device="cpu", rank=0, world_size=1)


@pytest.fixture
def replicas(tmp_path):
    """Two different caches of 53 items (as of two tokenizers), each opened with its replica's seed."""
    folders = [token_cache(tmp_path / "a", seed=0), token_cache(tmp_path / "b", seed=1)]
    return StackedDatasets([CacheDataset(f, seed=s) for f, s in zip(folders, SEEDS)], SEEDS)


def separate_runs(data: StackedDatasets, k: int) -> list[list[torch.Tensor]]:
    """What K separate runs see in k steps, stacked: the reference for every stacked loader."""
    runs = [take(ResumableLoader(d, batch_size=8, seed=s), k) for d, s in zip(data.datasets, data.seeds)]
    return [stack_batches(step) for step in zip(*runs)]


def device_stack(data: StackedDatasets) -> StackedLoader:
    return StackedLoader([DeviceCacheLoader(d, batch_size=8, seed=s, device="cpu")
                          for d, s in zip(data.datasets, data.seeds)])


def test_batches_are_the_separate_runs_stacked(replicas):
    loader = build_loader(replicas, seed=99, **CPU)  # `seed` is not used: each replica has its own
    assert isinstance(loader, StackedLoader) and loader.replicas == 2 and len(loader) == 6  # 53 // 8
    k = 2 * len(loader) + 3  # two epoch boundaries
    expected = separate_runs(replicas, k)
    got = take(loader, k)
    same(got, expected)
    assert got[0][0].shape == (2, 8, 6) and got[0][1].shape == (2, 8)
    assert not torch.equal(got[0][0][0], got[0][0][1])  # the replicas do see different data
    same(take(device_stack(replicas), k), expected)  # the device loader stacks the same way


def test_stacking_keeps_the_batch_structure():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    out = stack_batches([{"x": (a, [a]), "y": a}, {"x": (b, [b]), "y": b}])
    assert isinstance(out["x"], tuple) and isinstance(out["x"][1], list)
    assert torch.equal(out["x"][1][0], torch.stack([a, b])) and out["y"].shape == (2, 2, 3)
    with pytest.raises(DataError, match="differ in structure"):
        stack_batches([[a, a], [b]])


def test_resume_mid_epoch_and_across_epochs_is_exact(replicas):
    reference = separate_runs(replicas, 20)
    for cut in (3, 6, 7, 13):
        first = build_loader(replicas, seed=0, **CPU)
        head = take(first, cut)
        state = first.state_dict()
        if cut == 3:
            assert state == {"replicas": [{"epoch": 0, "batch_in_epoch": 3}] * 2}
        second = build_loader(replicas, seed=0, **CPU)
        second.load_state_dict(state)
        same(head + take(second, 20 - cut), reference)
    # a DataLoader-path checkpoint resumes on device loaders (train.data_on_device changed on resume)
    first = build_loader(replicas, seed=0, **CPU)
    head = take(first, 9)
    dev = device_stack(replicas)
    dev.load_state_dict(first.state_dict())
    same(head + take(dev, 11), reference)


def test_a_state_of_another_replica_count_is_refused(replicas):
    loader = build_loader(replicas, seed=0, **CPU)
    three = StackedDatasets([*replicas.datasets, CacheDataset(replicas.datasets[0].folder, seed=7)], [*SEEDS, 7])
    with pytest.raises(DataError, match="2 replica.*has 3"):
        build_loader(three, seed=0, **CPU).load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="one position per replica"):
        loader.load_state_dict({"epoch": 0, "batch_in_epoch": 0})


def test_replicas_that_cannot_stack_are_refused(tmp_path):
    tokens = CacheDataset(token_cache(tmp_path / "t"), seed=3)
    with pytest.raises(ConfigError, match=r"replica 1: CacheDataset\(.*short\) has 40 items, replica 0 .* has 53"):
        StackedDatasets([tokens, CacheDataset(token_cache(tmp_path / "short", n=40), seed=5)], SEEDS)
    latents = CacheDataset(latent_cache(tmp_path / "l", n=53), seed=5)
    with pytest.raises(ConfigError, match=r"replica 1: .*\(3, 2, 2\).*replica 0 .*\(6,\)"):
        StackedDatasets([tokens, latents], SEEDS)
    with pytest.raises(ConfigError, match="replica 1: .*seed 3 but the replica's seed is 5"):
        StackedDatasets([tokens, tokens], SEEDS)
    with pytest.raises(ConfigError, match="2 datasets but 1 seeds"):
        StackedDatasets([tokens, tokens], [3])
    with pytest.raises(ConfigError, match="at least one replica"):
        StackedDatasets([], [])


def test_build_loader_picks_the_loader(tmp_path):
    cache = CacheDataset(token_cache(tmp_path / "c"), seed=2)
    for on_device in (None, False):
        loader = build_loader(cache, seed=2, on_device=on_device, **CPU)
        assert isinstance(loader, ResumableLoader) and loader.sampler.seed == 2
    images = [(torch.zeros(3), 0)] * 16
    for dataset in (cache, images):
        with pytest.raises(ConfigError, match="data_on_device=true needs a token/latent cache on a CUDA device"):
            build_loader(dataset, seed=0, on_device=True, **CPU)
    with pytest.raises(ConfigError, match="data_on_device"):
        from_dict(TrainConfig, {"data_on_device": "yes"}, "train")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_loader_holds_a_cache_on_cuda(replicas):
    loader = build_loader(replicas, seed=0, on_device=True, **{**CPU, "device": "cuda"})
    assert all(isinstance(r, DeviceCacheLoader) for r in loader.loaders)
    same(take(loader, 8), separate_runs(replicas, 8))
