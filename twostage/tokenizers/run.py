"""Tokenizer runs end to end, for every kind: train one (or K seeds of one VQ config as one joint run),
and encode a split into a stage-2 cache.

    kind, cfg = registry.load_config("tokenizer", "vq_fmnist_f4", ["crt.enabled=true"])
    train_run(cfg, "runs/vq_crt")
    train_replicas(cfg, ["runs/vq_crt_s0", "runs/vq_crt_s1"], seeds=[0, 1], pack="runs/vq_crt_pack")
    encode_run("runs/vq_crt", "train", "caches/vq_crt_train")

The run config's `kind` picks the Task (twostage/registry.py); the engine does the rest
(twostage/engine/trainer.py). `train_replicas` stacks K seeds' tokenizers under one vmapped loss
(twostage/engine/replicas.py), as twostage/generators/training.py does for generators: each replica
folder is a normal run folder (encode, eval, load read it), the pack folder holds the joint run.
`encode_run` streams each image and its horizontal flip through the run's tokenizer into one cache
folder (twostage/data/cache_writer.py): token ids for a discrete tokenizer, float16 latents with
per-channel statistics for a continuous one. The cache records the sha256 of the tokenizer weights it
came from, so a generator can always be traced to them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from twostage import config as configlib

log = logging.getLogger(__name__)


def train_run(cfg: Any, out: str | Path, *, dataset=None, resume_changes: bool = False) -> dict[str, float]:
    """Train (or resume) a tokenizer of `cfg.kind` into `out`; returns the last logged values.

    `dataset` replaces the configured training data (e.g. an in-memory dataset in a script);
    `resume_changes` accepts changed optimizer / schedule settings on resume (twostage/engine/trainer.py)."""
    from twostage import registry
    from twostage.data import build_dataset
    from twostage.engine.trainer import seed_everything, train

    kind = registry.tokenizer_kind(cfg.kind)
    seed_everything(cfg.train.seed)  # module initialization depends on it
    data = dataset if dataset is not None else build_dataset(cfg.data, "train")
    task = kind.task_class()(cfg)
    return train(task, cfg.train, data, Path(out), full_config=cfg, resume_changes=resume_changes)


def check_replicas(cfg: Any, outs: Sequence[str | Path], seeds: Sequence[int], pack: str | Path) -> None:
    """Everything `train_replicas` refuses, from the arguments and the config alone (before any work; a
    study checks its tokenizer packs with it when it builds its plan)."""
    from twostage.config import ConfigError
    from twostage.engine.replicas import check_replica_folders

    if cfg.kind != "vq":
        raise ConfigError(f"replicas: stacked tokenizer seeds are implemented for kind vq, not {cfg.kind} (its loss "
                          "reads weights outside a replica's view, e.g. the adaptive weights' last layers); train "
                          "its seeds as separate runs")
    check_replica_folders(outs, pack)
    k = len(outs)
    if len(seeds) != k:
        raise ConfigError(f"replicas: {k} --out, {len(seeds)} --seeds; give one seed per --out")
    if len(set(seeds)) != k:
        raise ConfigError(f"replicas: --seeds {' '.join(map(str, seeds))} repeat a seed; replicas of one config "
                          "differ only in their seed, so give each --out its own")
    lc, steps = cfg.loss, cfg.train.steps
    if lc.gan_weight > 0 and lc.disc_start < steps:  # the phase is active from step disc_start on
        raise ConfigError(f"replicas: loss.disc_start={lc.disc_start} < train.steps={steps}: the discriminator "
                          "phase cannot run in stacked replicas; train the seeds separately or set "
                          f"loss.disc_start={steps} or more (or loss.gan_weight=0)")


def train_replicas(cfg: Any, outs: Sequence[str | Path], seeds: Sequence[int], pack: str | Path, *,
                   resume_changes: bool = False) -> dict[str, float]:
    """Train K seeds of the VQ tokenizer config `cfg` (replica k: train.seed = seeds[k], run folder outs[k])
    as one joint run in `pack` (resumed from there); returns the joint run's last logs (loss_r<k> per
    replica). Replica k's task and data are built as `train_run` builds them after seed_everything(seeds[k]),
    so it starts as the separate run does and reads the same batches (twostage/data/stacked.py); the
    discriminator must not start within train.steps (only the autoencoder phase is stacked). Every check
    happens before any model or data is built."""
    from twostage import registry
    from twostage.data import build_dataset
    from twostage.data.stacked import StackedDatasets
    from twostage.engine.replicas import ReplicaTask, replica_configs
    from twostage.engine.trainer import seed_everything, train

    pack = Path(pack)
    check_replicas(cfg, outs, seeds, pack)
    kind = registry.tokenizer_kind(cfg.kind)
    configs = replica_configs(cfg, seeds)
    tasks, datasets = [], []
    for c in configs:
        seed_everything(c.train.seed)  # as train_run: module initialization depends on it
        datasets.append(build_dataset(c.data, "train"))
        tasks.append(kind.task_class()(c))
    task = ReplicaTask(tasks, [Path(o) for o in outs], configs)
    full = {"kind": cfg.kind, "train": configlib.to_dict(cfg.train),
            "replicas": [{"out": str(Path(o).resolve()), "seed": int(s)} for o, s in zip(outs, seeds)],
            "config": {k: v for k, v in configlib.to_dict(cfg).items() if k != "train"}}
    log.info("training %d seeds of one %s tokenizer config as one run in %s", len(outs), cfg.kind, pack)
    return train(task, configs[0].train, StackedDatasets(datasets, seeds), pack, full_config=full,
                 resume_changes=resume_changes)


def dataset_classes(dataset, labels: np.ndarray) -> int:
    """Number of classes: the dataset's class names when it has them, else max label + 1."""
    base = getattr(dataset, "dataset", dataset)
    names = getattr(base, "class_names", None)
    return len(names) if names else (int(labels.max()) + 1 if len(labels) else 0)


def split_loader(cfg: Any, split: str, batch_size: int, *, limit: int | None = None, num_workers: int = 0,
                 dataset=None):
    """(dataset, ordered loader) over a split of the run's data, optionally its first `limit` images."""
    from twostage.data import build_dataset, eval_loader
    from twostage.data.datasets import SubsetDataset

    data = dataset if dataset is not None else build_dataset(cfg.data, split)
    if limit is not None and limit < len(data):
        data = SubsetDataset(data, np.arange(limit))
    return data, eval_loader(data, batch_size, num_workers=num_workers, rank=0, world_size=1)


def encode_run(run: str | Path, split: str, out: str | Path, *, batch_size: int = 256, device: str = "auto",
               precision: str = "fp32", flip: bool = True, limit: int | None = None, overwrite: bool = False,
               num_workers: int = 0, step: int | None = None, weights: str = "auto", dataset=None,
               progress: bool | None = None) -> Path:
    """Encode a split of the run's data (and its horizontal flips) into a cache folder `out`.

    Under torchrun (WORLD_SIZE > 1) the split's batches of `batch_size` images are dealt round robin
    to the ranks, and rank 0 writes the one cache from them in order: the same file, labels, meta and
    channel statistics as one process with the same batch size (twostage/engine/distributed.py:
    deal_batches). A tokenizer that samples its posterior draws batch b's noise from (NOISE_SEED, b),
    so that too does not depend on the number of processes.

    `progress`: a progress bar with images/s on stderr; None (default) shows it when stderr is a terminal."""
    from tqdm.auto import tqdm

    from twostage.data import eval_loader
    from twostage.data.cache_writer import CacheWriter
    from twostage.data.datasets import SubsetDataset
    from twostage.data.token_cache import CacheMeta
    from twostage.engine.distributed import barrier, deal_batches, init_world
    from twostage.tokenizers.base import load_tokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    world = init_world()  # before the tokenizer: under NCCL it picks this rank's GPU
    tok = load_tokenizer(run, device=device, step=step, weights=weights)
    data, _ = split_loader(tok.config, split, batch_size, limit=limit, num_workers=num_workers, dataset=dataset)
    num_batches = -(-len(data) // batch_size)
    # This rank's global batches b = rank, rank + size, ...: every batch but the globally last is full,
    # so an ordered loader over their concatenation yields exactly those batches.
    mine = np.concatenate([np.arange(b * batch_size, min(len(data), (b + 1) * batch_size))
                           for b in range(world.rank, num_batches, world.size)] or [np.zeros(0, np.int64)])
    shard = data if not world.distributed else SubsetDataset(data, mine)
    batches = iter(eval_loader(shard, batch_size, num_workers=num_workers, rank=0, world_size=1))
    layout = tok.cache_layout()
    variants = 2 if flip else 1
    reseed = getattr(tok, "_noise", None)  # posterior-sampling tokenizers (KL) keep a noise generator
    seed = getattr(tok, "NOISE_SEED", 0)

    def encode(b: int):
        images, labels = next(batches)
        x = images.to(tok.device, non_blocking=True)
        if reseed is not None:  # batch b's noise from (seed, b): the same in any world size
            reseed().manual_seed(seed * 1_000_003 + b)
        codes = [tok.encode(x, precision)] + ([tok.encode(x.flip(-1), precision)] if flip else [])
        codes = torch.stack(codes, dim=1).reshape(x.shape[0], variants, *layout.item_shape)
        if world.distributed:  # sent to rank 0 in the storage dtype: rounding first changes nothing it stores
            codes = codes.to(_torch_dtype(layout.dtype)) if codes.is_floating_point() else codes
            return codes.cpu().numpy(), np.asarray(labels)
        return codes, labels

    start = time.perf_counter()
    if not world.is_main:  # the others encode their share and hand it to rank 0 (deal_batches)
        deal_batches(num_batches, world, encode, None)
        barrier(world)
        return out
    # disable=None: tqdm's own rule, on when stderr is a terminal, so logs and pipes stay clean.
    bar = tqdm(total=len(data), unit="img", desc=f"encode {split}", dynamic_ncols=True,
               disable=None if progress is None else not progress)
    with bar, CacheWriter(out, kind=layout.kind, num_items=len(data), variants=variants,
                          item_shape=layout.item_shape, dtype=layout.dtype, overwrite=overwrite,
                          channel_stats=layout.channel_stats) as writer:
        def consume(b: int, batch) -> None:
            codes, labels = batch
            codes = torch.as_tensor(codes).to(tok.device)  # channel statistics accumulate on one device
            writer.add(codes, labels)
            bar.update(codes.shape[0])
            if bar.disable and writer.done % (50 * batch_size) < codes.shape[0]:  # no bar: a log line now and then
                log.info("encoded %d / %d images (%.0f img/s)", writer.done, len(data),
                         writer.done / (time.perf_counter() - start))

        deal_batches(num_batches, world, encode, consume)
        h, w = tok.grid_size()
        meta = CacheMeta(
            kind=layout.kind, grid=(h, w), num_classes=dataset_classes(data, writer.labels),
            tokenizer_run=str(Path(run).resolve()), tokenizer_checksum=tok.checksum, split=split,
            image_size=tok.image_size, **layout.meta,
            extra={"variants": ["plain", "hflip"][:variants], "step": tok.step, "weights": tok.weights_path.name,
                   "precision": precision, "dtype": str(layout.dtype), "tokenizer_kind": tok.kind,
                   "stats_over": f"{len(data)} images x {variants} variants x {h * w} positions",
                   "data": configlib.to_dict(tok.config.data)},
        )
        writer.finish(meta)
    barrier(world)
    elapsed = time.perf_counter() - start
    log.info("encoded %d %s images x %d variants -> %s (grid %dx%d, %s, %.0f img/s, %d process%s)", len(data),
             split, variants, out, h, w, layout.kind, len(data) / max(elapsed, 1e-9), world.size,
             "es" if world.size > 1 else "")
    return out


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


__all__ = ["train_run", "train_replicas", "check_replicas", "encode_run", "split_loader", "dataset_classes"]
