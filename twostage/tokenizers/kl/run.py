"""KL-VAE runs end to end: train one, and encode a split into a latent cache for the DiT.

    cfg = twostage.config.load(KLRunConfig, "kl_fmnist_f4d8")
    train_kl(cfg, Path("runs/kl_f4d8"))
    encode_latents("runs/kl_f4d8", "train", "caches/kl_f4d8_train")

The cache (format: twostage/data/token_cache.py) holds latents.npy (N, V, d, h, w) float16 posterior
means of each image and of its horizontal flip, labels.npy and meta.json with kind "latents", the
tokenizer checksum and the **per-channel mean / std over the whole cache** (all images, both
variants, all positions; accumulated in float64), which the DiT normalizes its inputs with.
Latents are streamed into a memory-mapped file, so an ImageNet-size cache needs no RAM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from twostage import config as configlib
from twostage.tokenizers.kl.config import KLRunConfig

log = logging.getLogger(__name__)


def train_kl(cfg: KLRunConfig, run_dir: str | Path, *, dataset=None) -> dict[str, float]:
    """Train (or resume) a KL-VAE into `run_dir`; returns the last logged values.

    `dataset` overrides the configured training data (tests)."""
    from twostage.data import build_dataset
    from twostage.engine.trainer import seed_everything, train
    from twostage.tokenizers.kl.task import KLTokenizerTask

    seed_everything(cfg.train.seed)  # module init depends on it
    data = dataset if dataset is not None else build_dataset(cfg.data, "train")
    task = KLTokenizerTask(cfg)
    return train(task, cfg.train, data, Path(run_dir), full_config=cfg)


def _device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _num_classes(dataset, labels: np.ndarray) -> int:
    base = getattr(dataset, "dataset", dataset)
    names = getattr(base, "class_names", None)
    return len(names) if names else (int(labels.max()) + 1 if len(labels) else 0)


def encode_latents(run: str | Path, split: str, out: str | Path, *, batch_size: int = 64, device: str = "auto",
                   precision: str = "fp32", flip: bool = True, limit: int | None = None, overwrite: bool = False,
                   sample: bool = False, num_workers: int = 0, step: int | None = None, prefer_ema: bool = True,
                   dataset=None) -> Path:
    """Encode a split of the run's data (and its horizontal flips) into a latent cache folder `out`.

    sample=True stores posterior samples instead of means (the KL weight is tiny, so they barely
    differ; means make the cache deterministic). `dataset` overrides the run's data (tests).
    """
    from twostage.data import build_dataset, eval_loader
    from twostage.data.datasets import SubsetDataset
    from twostage.data.token_cache import CacheMeta
    from twostage.tokenizers.kl.tokenizer import KLTokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    tok = KLTokenizer.from_pretrained(run, device=_device(device), step=step, prefer_ema=prefer_ema)
    data = dataset if dataset is not None else build_dataset(tok.config.data, split)
    if limit is not None and limit < len(data):
        data = SubsetDataset(data, np.arange(limit))
    loader = eval_loader(data, batch_size, num_workers=num_workers, rank=0, world_size=1)
    n, (h, w), d = len(data), tok.grid_size(), tok.latent_channels
    variants = 2 if flip else 1

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    latents = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.float16, shape=(n, variants, d, h, w))
    labels = np.zeros(n, dtype=np.int64)
    total = torch.zeros(d, dtype=torch.float64, device=tok.device)
    total_sq = torch.zeros(d, dtype=torch.float64, device=tok.device)
    gen = torch.Generator(device=tok.device).manual_seed(0) if sample else None
    start, done = time.perf_counter(), 0
    for images, batch_labels in loader:
        x = images.to(tok.device, non_blocking=True)
        b = x.shape[0]
        zs = [tok.encode(x, precision, sample, gen)]
        if flip:
            zs.append(tok.encode(x.flip(-1), precision, sample, gen))
        z = torch.stack(zs, dim=1)  # (B, V, d, h, w)
        # Statistics of what is stored (float16-rounded), so normalization matches the training inputs.
        z16 = z.half()
        zf = z16.double().transpose(0, 2).reshape(d, -1)  # (d, V * B * h * w)
        total += zf.sum(1)
        total_sq += zf.pow(2).sum(1)
        latents[done : done + b] = z16.cpu().numpy()  # one device->host copy per batch
        labels[done : done + b] = np.asarray(batch_labels)
        done += b
        if done % (50 * batch_size) < b:
            log.info("encoded %d / %d images (%.0f img/s)", done, n, done / (time.perf_counter() - start))
    if done != n:
        raise RuntimeError(f"the loader yielded {done} images for a split of {n}")
    latents.flush()
    del latents
    count = float(n * variants * h * w)
    mean = total / max(count, 1.0)
    std = (total_sq / max(count, 1.0) - mean.pow(2)).clamp_min(0).sqrt()
    np.save(tmp / "labels.npy", labels)
    meta = CacheMeta(
        kind="latents", grid=(h, w), num_classes=_num_classes(data, labels), tokenizer_run=str(Path(run).resolve()),
        tokenizer_checksum=tok.checksum, split=split, channels=d, latent_mean=mean.tolist(),
        latent_std=std.tolist(), image_size=tok.image_size,
        extra={"variants": ["plain", "hflip"][:variants], "step": tok.step, "weights": tok.weights_path.name,
               "precision": precision, "dtype": "float16", "posterior": "sample" if sample else "mean",
               "stats_over": f"{n} images x {variants} variants x {h * w} positions",
               "data": configlib.to_dict(tok.config.data)},
    )
    (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)  # the cache appears complete or not at all
    elapsed = time.perf_counter() - start
    log.info("encoded %d %s images x %d variants -> %s (grid %dx%d, %d channels, %.0f img/s)",
             n, split, variants, out, h, w, d, n / max(elapsed, 1e-9))
    return out


__all__ = ["train_kl", "encode_latents"]
