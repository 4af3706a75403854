"""Tokenizer runs end to end, for every kind: train one, and encode a split into a stage-2 cache.

    kind, cfg = registry.load_config("tokenizer", "vq_fmnist_f4", ["crt.enabled=true"])
    train_run(cfg, "runs/vq_crt")
    encode_run("runs/vq_crt", "train", "caches/vq_crt_train")

The run config's `kind` picks the Task (twostage/registry.py); the engine does the rest
(twostage/engine/trainer.py). `encode_run` streams each image and its horizontal flip through the
run's tokenizer into one cache folder (twostage/data/cache_writer.py): token ids for a discrete
tokenizer, float16 latents with per-channel statistics for a continuous one. The cache records the
sha256 of the tokenizer weights it came from, so a generator can always be traced to them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

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

    `progress`: a progress bar with images/s on stderr; None (default) shows it when stderr is a terminal."""
    from tqdm.auto import tqdm

    from twostage.data.cache_writer import CacheWriter
    from twostage.data.token_cache import CacheMeta
    from twostage.tokenizers.base import load_tokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    tok = load_tokenizer(run, device=device, step=step, weights=weights)
    data, loader = split_loader(tok.config, split, batch_size, limit=limit, num_workers=num_workers, dataset=dataset)
    layout = tok.cache_layout()
    variants = 2 if flip else 1
    start = time.perf_counter()
    # disable=None: tqdm's own rule, on when stderr is a terminal, so logs and pipes stay clean.
    bar = tqdm(total=len(data), unit="img", desc=f"encode {split}", dynamic_ncols=True,
               disable=None if progress is None else not progress)
    with bar, CacheWriter(out, kind=layout.kind, num_items=len(data), variants=variants,
                          item_shape=layout.item_shape, dtype=layout.dtype, overwrite=overwrite,
                          channel_stats=layout.channel_stats) as writer:
        for images, labels in loader:
            x = images.to(tok.device, non_blocking=True)
            codes = [tok.encode(x, precision)] + ([tok.encode(x.flip(-1), precision)] if flip else [])
            writer.add(torch.stack(codes, dim=1).reshape(x.shape[0], variants, *layout.item_shape), labels)
            bar.update(x.shape[0])
            if bar.disable and writer.done % (50 * batch_size) < x.shape[0]:  # no bar: a log line now and then
                log.info("encoded %d / %d images (%.0f img/s)", writer.done, len(data),
                         writer.done / (time.perf_counter() - start))
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
    elapsed = time.perf_counter() - start
    log.info("encoded %d %s images x %d variants -> %s (grid %dx%d, %s, %.0f img/s)", len(data), split, variants,
             out, h, w, layout.kind, len(data) / max(elapsed, 1e-9))
    return out


__all__ = ["train_run", "encode_run", "split_loader", "dataset_classes"]
