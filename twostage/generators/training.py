"""Training a generator of any kind: one run, or K replicas of one config trained as one.

    train_run(cfg, "caches/f4_train", "runs/ar", val_cache="caches/f4_val")
    train_replicas(cfg, caches=["caches/a_train", "caches/b_train"], outs=["runs/a_s0", "runs/b_s0"],
                   seeds=[0, 0], pack="runs/pack", val_caches=["caches/a_val", "caches/b_val"])

The kind's `build_task` (twostage/registry.py) makes the Task and its data; the engine trains it.
Replicas (twostage/engine/replicas.py) differ only in train.seed and in their cache (e.g. the same
tokenizer config trained with another seed, or another tokenizer with the same code shape): the
study's seeds and tokenizers of one grid point cost about one run on a GPU instead of K. Each replica's
folder is a normal run folder; `pack` is the joint run's folder (stacked checkpoints, metrics log),
from which an interrupted joint run resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from twostage import config as configlib
from twostage import registry
from twostage.config import ConfigError

log = logging.getLogger(__name__)


def train_run(cfg: Any, cache: str | Path, out: str | Path, *, val_cache: str | Path | None = None,
              resume_changes: bool = False) -> dict[str, float]:
    """Train (or resume) a generator of the config's kind on a cache into `out`; returns the last logs."""
    from twostage.engine.trainer import train

    kind = registry.generator_kind(cfg.kind)
    task, data = kind.task_fn()(cfg, Path(cache), Path(out), val_cache=Path(val_cache) if val_cache else None)
    return train(task, cfg.train, data, Path(out), full_config=cfg, resume_changes=resume_changes)


def _check_replicas(caches: Sequence, outs: Sequence, seeds: Sequence[int], val_caches: Sequence | None,
                    pack: Path) -> None:
    from twostage.engine.replicas import check_replica_folders

    check_replica_folders(outs, pack)
    k = len(outs)
    if len(caches) != k or len(seeds) != k or (val_caches is not None and len(val_caches) != k):
        counts = f"{len(caches)} --tokens, {len(outs)} --out, {len(seeds)} --seeds" + (
            f", {len(val_caches)} --val-tokens" if val_caches is not None else "")
        raise ConfigError(f"replicas: {counts}; give one of each per replica (a cache may repeat)")
    pairs = list(zip([Path(c).resolve() for c in caches], seeds))
    if len(set(pairs)) != k:
        raise ConfigError("replicas: two replicas have the same cache and seed, so they would be the same run")


def train_replicas(cfg: Any, caches: Sequence[str | Path], outs: Sequence[str | Path], seeds: Sequence[int],
                   pack: str | Path, *, val_caches: Sequence[str | Path] | None = None,
                   resume_changes: bool = False) -> dict[str, float]:
    """Train K replicas of `cfg` (replica k: train.seed = seeds[k], cache caches[k], folder outs[k]) as
    one joint run in `pack` (resumed from there); returns the joint run's last logs (loss_r<k> per
    replica). Every check (counts, folders, cache shapes, what the folders already hold) happens before
    anything is written."""
    from twostage.data.stacked import StackedDatasets
    from twostage.engine.replicas import ReplicaTask, replica_configs
    from twostage.engine.trainer import train

    pack = Path(pack)
    _check_replicas(caches, outs, seeds, val_caches, pack)
    kind = registry.generator_kind(cfg.kind)
    if kind.replicas_share_cache(cfg) and len({Path(c).resolve() for c in caches}) > 1:
        raise ConfigError(f"replicas of this {cfg.kind} generator must read one cache (they differ in --seeds only): "
                          f"with {kind.replicas_share_cache_if}=true its loss uses a network of its own cache's "
                          "tokenizer, which one stacked loss cannot do per replica; train runs on other caches "
                          "separately or as their own replica group")
    build = kind.task_fn()
    configs = replica_configs(cfg, seeds)
    tasks, datasets = [], []
    for k, (c, cache, out) in enumerate(zip(configs, caches, outs)):
        val = Path(val_caches[k]) if val_caches is not None else None
        task, data = build(c, Path(cache), Path(out), val_cache=val)
        tasks.append(task)
        datasets.append(data)
    try:
        stacked = StackedDatasets(datasets, [int(s) for s in seeds])
        task = ReplicaTask(tasks, [Path(o) for o in outs], configs)
    except ValueError as err:  # caches of different shape: the user's choice of replicas
        raise ConfigError(f"replicas cannot be trained together: {err}") from None
    full = {"kind": cfg.kind, "train": configlib.to_dict(cfg.train),
            "replicas": [{"out": str(Path(o).resolve()), "cache": str(Path(c).resolve()), "seed": int(s),
                          "val_cache": str(Path(val_caches[i]).resolve()) if val_caches is not None else None}
                         for i, (o, c, s) in enumerate(zip(outs, caches, seeds))],
            "config": {k: v for k, v in configlib.to_dict(cfg).items() if k != "train"}}
    log.info("training %d replicas of one %s config as one run in %s", len(outs), cfg.kind, pack)
    return train(task, configs[0].train, stacked, pack, full_config=full, resume_changes=resume_changes)


__all__ = ["train_run", "train_replicas"]
