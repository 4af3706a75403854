"""`twostage tokenizer train | encode | reconstruct`.

    twostage tokenizer train vq_fmnist_f8 model.codebook_size=4096 crt.enabled=true --out runs/f8_crt
    twostage tokenizer encode runs/f8_crt --split train --out caches/f8_crt_train
    twostage tokenizer reconstruct runs/f8_crt --out runs/f8_crt/recon.png

`encode` writes the token cache that stage 2 trains on (format: twostage/data/token_cache.py):
tokens.npy (N, 2, h*w) ids of each image and of its horizontal flip (uint16 when the codebook has
<= 65536 codes, else int32; memory-mappable), labels.npy, meta.json (grid, codebook size, the sha256
of the tokenizer weights file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` command group to the top-level CLI."""
    top = subparsers.add_parser("tokenizer", help="train a VQ tokenizer, encode datasets to tokens, reconstruct",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a VQ tokenizer (resumes automatically when RUN has a checkpoint)")
    p.add_argument("config", help="preset name in configs/ (e.g. vq_fmnist_f8) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.codebook_size=4096 crt.enabled=true")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.set_defaults(func=_guard(cmd_train))

    p = sub.add_parser("encode", help="encode a split (and its horizontal flips) to a token cache")
    p.add_argument("run", type=Path, help="tokenizer run folder")
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--out", required=True, type=Path, help="cache folder to create")
    _inference_args(p, batch=256)
    p.add_argument("--no-flip", action="store_true", help="store only the plain variant")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N images (for quick checks)")
    p.set_defaults(func=_guard(cmd_encode))

    p = sub.add_parser("reconstruct", help="a grid of images (odd rows) and their reconstructions (even rows)")
    p.add_argument("run", type=Path, help="tokenizer run folder")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--num", type=int, default=32, help="number of images")
    p.add_argument("--per-row", type=int, default=8)
    _inference_args(p, batch=64)
    p.set_defaults(func=_guard(cmd_reconstruct))


def _inference_args(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--raw", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print expected problems (config, data, checkpoint) as one message instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        from twostage.config import ConfigError
        from twostage.data.errors import DataError
        from twostage.engine.checkpoint import CheckpointError
        from twostage.tokenizers.pretrained import TokenizerLoadError

        try:
            return fn(args)
        except ConfigError:
            raise  # the top-level CLI prints config errors
        except (DataError, CheckpointError, TokenizerLoadError, FileExistsError) as err:
            print(f"tokenizer error: {err}", file=sys.stderr)
            return 1

    run.__doc__ = fn.__doc__
    return run


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """Train a tokenizer into --out (resume if it already holds a checkpoint of the same config)."""
    from twostage import config as configlib
    from twostage.data import build_dataset
    from twostage.engine.trainer import seed_everything, train
    from twostage.tokenizers.config import TokenizerRunConfig
    from twostage.tokenizers.task import VQTokenizerTask

    cfg = configlib.load(TokenizerRunConfig, args.config, args.overrides)
    seed_everything(cfg.train.seed)  # module init depends on it
    dataset = build_dataset(cfg.data, "train")
    task = VQTokenizerTask(cfg)
    last = train(task, cfg.train, dataset, args.out, full_config=cfg)
    shown = {k: round(v, 5) for k, v in last.items() if k.split("/")[-1] in ("loss", "usage", "crt", "pixel")}
    print(f"trained {args.out}: {shown}")
    return 0


def _loader(cfg, split: str, args: argparse.Namespace, limit: int | None = None):
    from twostage.data import build_dataset, eval_loader
    from twostage.data.datasets import SubsetDataset

    dataset = build_dataset(cfg.data, split)
    if limit is not None and limit < len(dataset):
        dataset = SubsetDataset(dataset, np.arange(limit))
    loader = eval_loader(dataset, args.batch_size, num_workers=args.num_workers, rank=0, world_size=1)
    return dataset, loader


def _num_classes(dataset, labels: np.ndarray) -> int:
    base = getattr(dataset, "dataset", dataset)
    names = getattr(base, "class_names", None)
    return len(names) if names else int(labels.max()) + 1 if len(labels) else 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode every image of a split, plain and horizontally flipped, into a memory-mapped cache."""
    from twostage.data.token_cache import CacheMeta, token_dtype
    from twostage.tokenizers.pretrained import Tokenizer

    out: Path = args.out
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    tok = Tokenizer.from_pretrained(args.run, device=_device(args.device), step=args.step, prefer_ema=not args.raw)
    dataset, loader = _loader(tok.config, args.split, args, args.limit)
    n, (h, w) = len(dataset), tok.grid_size()
    variants = 1 if args.no_flip else 2
    dtype = token_dtype(tok.codebook_size)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype, shape=(n, variants, h * w))
    labels = np.zeros(n, dtype=np.int64)
    start, done = time.perf_counter(), 0
    for images, batch_labels in loader:
        images = images.to(tok.device, non_blocking=True)
        b = images.shape[0]
        ids = [tok.encode(images, args.precision)]
        if variants == 2:
            ids.append(tok.encode(images.flip(-1), args.precision))
        # (V, B, h, w) -> (B, V, h*w), one device->host copy per batch
        stacked = torch.stack(ids, dim=1).flatten(2).cpu().numpy()
        tokens[done : done + b] = stacked.astype(dtype, copy=False)
        labels[done : done + b] = np.asarray(batch_labels)
        done += b
        if done % (50 * args.batch_size) < b:
            log.info("encoded %d / %d images (%.0f img/s)", done, n, done / (time.perf_counter() - start))
    if done != n:
        raise RuntimeError(f"the loader yielded {done} images for a split of {n}")
    tokens.flush()
    del tokens
    np.save(tmp / "labels.npy", labels)
    meta = CacheMeta(
        kind="tokens", grid=(h, w), num_classes=_num_classes(dataset, labels), tokenizer_run=str(Path(args.run).resolve()),
        tokenizer_checksum=tok.checksum, split=args.split, codebook_size=tok.codebook_size,
        image_size=tok.image_size,
        extra={"variants": ["plain", "hflip"][:variants], "step": tok.step, "weights": tok.weights_path.name,
               "precision": args.precision, "dtype": str(dtype), "data": _data_summary(tok.config)},
    )
    (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)  # the cache appears complete or not at all
    elapsed = time.perf_counter() - start
    print(f"encoded {n} {args.split} images x {variants} variants -> {out} "
          f"(grid {h}x{w}, codebook {tok.codebook_size}, {dtype}, {n / max(elapsed, 1e-9):.0f} img/s)")
    return 0


def _data_summary(cfg) -> dict:
    from twostage import config as configlib

    return configlib.to_dict(cfg.data)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Save originals and reconstructions of the first --num images of a split as one PNG."""
    from twostage.tokenizers.images import interleave_pairs, psnr, save_grid
    from twostage.tokenizers.pretrained import Tokenizer

    tok = Tokenizer.from_pretrained(args.run, device=_device(args.device), step=args.step, prefer_ema=not args.raw)
    _, loader = _loader(tok.config, args.split, args, args.num)
    originals, recons = [], []
    for images, _ in loader:
        x = tok._input(images)
        originals.append(x.cpu())
        recons.append(tok.reconstruct(x, args.precision).cpu())
    x, r = torch.cat(originals), torch.cat(recons)
    if x.shape[1] != r.shape[1]:
        x = x[:, :1]
    grid, nrow = interleave_pairs(x, r, args.per_row)
    save_grid(grid, args.out, nrow=nrow)
    print(f"wrote {args.out}: {len(x)} {args.split} images, PSNR {float(psnr(r, x).mean()):.2f} dB "
          f"(checkpoint step {tok.step}, weights {tok.weights_path.name})")
    return 0
