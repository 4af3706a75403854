"""`twostage tokenizer train | encode | reconstruct | probe`.

    twostage tokenizer train vq_fmnist_f8 model.codebook_size=4096 crt.enabled=true --out runs/f8_crt
    twostage tokenizer encode runs/f8_crt --split train --out caches/f8_crt_train
    twostage tokenizer reconstruct runs/f8_crt --out runs/f8_crt/recon.png
    twostage tokenizer probe runs/f8_crt          # held-out next-latent error of a fresh causal probe
    twostage tokenizer train kl_fmnist_f4d8 vf.enabled=false --out runs/kl_f4d8   # kind: kl (KL-VAE)

The config's `kind` picks the tokenizer: `vq` (default; VQ with optional CRT) or `kl` (KL-VAE with
optional VF loss). A KL run's `encode` writes a latent cache (float16 posterior means and per-channel
statistics, see twostage/tokenizers/kl/run.py) instead of token ids.

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
    top = subparsers.add_parser("tokenizer", help="train a VQ / KL tokenizer, encode datasets to a cache, reconstruct, probe",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a tokenizer of the config's kind (resumes when RUN has a checkpoint)")
    p.add_argument("config", help="preset name in twostage/presets/ (e.g. vq_fmnist_f8) or a YAML file")
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

    p = sub.add_parser("probe", help="fit a fresh 2-layer causal probe on frozen VQ latents; held-out next-latent error")
    p.add_argument("run", type=Path, help="VQ tokenizer run folder")
    p.add_argument("--train-images", type=int, default=10000, help="training-split images the probe is fitted on")
    p.add_argument("--val-images", type=int, default=2000, help="validation-split images it is scored on")
    p.add_argument("--steps", type=int, default=2000, help="probe optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default RUN/eval/probe-stepN.json)")
    _inference_args(p, batch=256)
    p.set_defaults(func=_guard(cmd_probe))


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
        from twostage.tokenizers.vq.tokenizer import TokenizerLoadError

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
    from twostage.tokenizers.vq.config import VQRunConfig
    from twostage.tokenizers.vq.task import VQTokenizerTask

    from twostage import registry

    kind = registry.source_kind("tokenizer", args.config, args.overrides)
    if kind == "kl":
        from twostage.tokenizers.kl.config import KLRunConfig
        from twostage.tokenizers.kl.run import train_kl

        cfg = configlib.load(KLRunConfig, args.config, args.overrides)
        last = train_kl(cfg, args.out)
        print(f"trained {args.out}: {_shown(last)}")
        return 0
    if kind != "vq":
        raise configlib.ConfigError(f"{args.config}: kind={kind!r} is not a tokenizer kind; choose 'vq' or 'kl'")
    cfg = configlib.load(VQRunConfig, args.config, args.overrides)
    seed_everything(cfg.train.seed)  # module init depends on it
    dataset = build_dataset(cfg.data, "train")
    task = VQTokenizerTask(cfg)
    last = train(task, cfg.train, dataset, args.out, full_config=cfg)
    print(f"trained {args.out}: {_shown(last)}")
    return 0


def _shown(last: dict[str, float]) -> dict[str, float]:
    keep = ("loss", "usage", "crt", "pixel", "kl", "vf")
    return {k: round(v, 5) for k, v in last.items() if k.split("/")[-1] in keep}


def _load(args: argparse.Namespace):
    """The run's tokenizer, VQ or KL (both expose config, step, weights_path, _input, reconstruct)."""
    from twostage.tokenizers.kl.tokenizer import KLTokenizer, is_kl_run
    from twostage.tokenizers.vq.tokenizer import Tokenizer

    cls = KLTokenizer if is_kl_run(args.run) else Tokenizer
    return cls.from_pretrained(args.run, device=_device(args.device), step=args.step, prefer_ema=not args.raw)


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
    from twostage.tokenizers.vq.tokenizer import Tokenizer

    from twostage.tokenizers.kl.tokenizer import is_kl_run

    out: Path = args.out
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if is_kl_run(args.run):
        from twostage.tokenizers.kl.run import encode_latents

        encode_latents(args.run, args.split, out, batch_size=args.batch_size, device=args.device,
                       precision=args.precision, flip=not args.no_flip, limit=args.limit, overwrite=args.overwrite,
                       num_workers=args.num_workers, step=args.step, prefer_ema=not args.raw)
        print(f"encoded the {args.split} split -> latent cache {out}")
        return 0
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
    from twostage.common.images import interleave_pairs, psnr, save_grid

    tok = _load(args)
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


def _images(cfg, split: str, limit: int, args: argparse.Namespace) -> torch.Tensor:
    _, loader = _loader(cfg, split, args, limit)
    return torch.cat([images for images, _ in loader])


def cmd_probe(args: argparse.Namespace) -> int:
    """Fit a fresh causal probe on the frozen tokenizer's latents; write held-out errors as JSON."""
    from twostage.tokenizers.kl.tokenizer import is_kl_run
    from twostage.tokenizers.vq.tokenizer import Tokenizer, TokenizerLoadError
    from twostage.tokenizers.vq.probe import probe_tokenizer

    if is_kl_run(args.run):
        raise TokenizerLoadError(f"{args.run} is a KL-VAE run; the probe measures VQ (pre-quantization and code) latents")
    tok = Tokenizer.from_pretrained(args.run, device=_device(args.device), step=args.step, prefer_ema=not args.raw)
    start = time.perf_counter()
    train = tok._input(_images(tok.config, "train", args.train_images, args)).cpu()
    val = tok._input(_images(tok.config, "val", args.val_images, args)).cpu()
    results = probe_tokenizer(tok.model, train, val, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                              device=tok.device)
    record = {
        "metric": "held-out next-latent l2 error of a fresh 2-layer causal probe (l2-normalized latents)",
        "tokenizer_run": str(args.run), "tokenizer_step": tok.step, "tokenizer_checksum": tok.checksum,
        "crt_enabled": bool(tok.config.crt.enabled), "seed": args.seed, "wall_s": round(time.perf_counter() - start, 2),
        "views": {view: r.to_dict() for view, r in results.items()},
    }
    out = args.out or Path(args.run) / "eval" / f"probe-step{tok.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    for view, r in results.items():
        print(f"{view:9s} probe error: val {r.val_error:.4f}  train {r.train_error:.4f}  "
              f"({r.train_images} train / {r.val_images} val images, {r.steps} steps)")
    print(f"wrote {out}")
    return 0
