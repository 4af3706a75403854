"""`twostage tokenizer train | encode | reconstruct | probe`, for every tokenizer kind.

    twostage tokenizer train vq_fmnist_f8 model.codebook_size=4096 crt.enabled=true --out runs/f8_crt
    twostage tokenizer train kl_fmnist_f4d8 vf.enabled=false --out runs/kl_f4d8   # kind: kl (KL-VAE)
    twostage tokenizer train vq_fmnist_f4 train.steps=3000 --out runs/s0 runs/s1 --seeds 0 1 --pack runs/s01
    twostage tokenizer encode runs/f8_crt --split train --out caches/f8_crt_train
    twostage tokenizer reconstruct runs/f8_crt --out runs/f8_crt/recon.png
    twostage tokenizer probe runs/f8_crt          # held-out next-latent error of a fresh causal probe (VQ)

The config's `kind` picks the tokenizer (twostage/registry.py). `encode` writes the cache stage 2
trains on (format: twostage/data/token_cache.py): token ids of each image and of its horizontal flip
for a discrete tokenizer, float16 latents with per-channel statistics for a continuous one; meta.json
records the grid and the sha256 of the tokenizer weights. `train` with several --out trains K seeds of
one VQ config as one joint run of stacked replicas (twostage/tokenizers/run.py train_replicas), each
--out a normal run folder, the joint run (and its resume point) in --pack.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` command group to the top-level CLI."""
    from twostage import registry
    from twostage.engine.replicas import add_replica_options

    kinds = ", ".join(f"{k} ({v.summary})" for k, v in registry.TOKENIZERS.items())
    top = subparsers.add_parser("tokenizer", help="train a tokenizer, encode datasets to a cache, reconstruct, probe",
                                description=f"{__doc__}\nKinds: {kinds}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a tokenizer of the config's kind (resumes when RUN has a checkpoint)")
    p.add_argument("config", help="preset name in twostage/presets/ (e.g. vq_fmnist_f8) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.codebook_size=4096 crt.enabled=true")
    add_replica_options(p, "run folder; several: seeds of one VQ config trained as one (needs --seeds, --pack)")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume RUN although optimizer / schedule settings changed (recorded in run.json)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="encode a split (and its horizontal flips) to a stage-2 cache")
    p.add_argument("run", type=Path, help="tokenizer run folder")
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--out", required=True, type=Path, help="cache folder to create")
    _inference_args(p, batch=256)
    p.add_argument("--no-flip", action="store_true", help="store only the plain variant")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N images (for quick checks)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("reconstruct", help="a grid of images (odd rows) and their reconstructions (even rows)")
    p.add_argument("run", type=Path, help="tokenizer run folder")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--num", type=int, default=32, help="number of images")
    p.add_argument("--per-row", type=int, default=8)
    _inference_args(p, batch=64)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("probe", help="fit a fresh 2-layer causal probe on frozen VQ latents; held-out next-latent error")
    p.add_argument("run", type=Path, help="VQ tokenizer run folder")
    p.add_argument("--train-images", type=int, default=10000, help="training-split images the probe is fitted on")
    p.add_argument("--val-images", type=int, default=2000, help="validation-split images it is scored on")
    p.add_argument("--steps", type=int, default=2000, help="probe optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default RUN/eval/probe-stepN.json)")
    _inference_args(p, batch=256)
    p.set_defaults(func=cmd_probe)


def _inference_args(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                   help="auto: the EMA weights when the run saved them, else the raw ones")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))


def cmd_train(args: argparse.Namespace) -> int:
    """Train a tokenizer into --out (resume if it already holds a checkpoint of the same config), or K
    seeds of it as replicas into several --out (resume from --pack); as `generator train` parses them."""
    from twostage import api
    from twostage.engine.replicas import wants_replicas

    cfg = api.load_config(args.config, args.overrides, group="tokenizer")
    if not wants_replicas(args):
        out = args.out[0]
        last = api.train_tokenizer(cfg, out, resume_changes=args.resume_with_changes)
    else:
        out = args.pack
        last = api.train_tokenizer_replicas(cfg, args.out, args.seeds, args.pack,
                                            resume_changes=args.resume_with_changes)
    keep = ("loss", "usage", "crt", "pixel", "kl", "vf")
    print(f"trained {out}: {({k: round(v, 5) for k, v in last.items() if k.split('/')[-1] in keep})}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode every image of a split, plain and horizontally flipped, into a memory-mapped cache."""
    from twostage import api
    from twostage.data.token_cache import read_meta

    out = api.encode(args.run, args.split, args.out, batch_size=args.batch_size, device=args.device,
                     precision=args.precision, flip=not args.no_flip, limit=args.limit, overwrite=args.overwrite,
                     num_workers=args.num_workers, step=args.step, weights=args.weights)
    from twostage.engine.distributed import init_world

    if not init_world().is_main:  # under torchrun rank 0 wrote the cache and reports it
        return 0
    meta = read_meta(out)
    size = f"codebook {meta.codebook_size}" if meta.codebook_size else f"{meta.channels} channels"
    print(f"encoded the {args.split} split -> {meta.kind} cache {out} (grid {meta.grid[0]}x{meta.grid[1]}, {size})")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Save originals and reconstructions of the first --num images of a split as one PNG."""
    from twostage import api
    from twostage.common.images import interleave_pairs, psnr, save_grid
    from twostage.tokenizers.run import split_loader

    tok = api.load_tokenizer(args.run, device=args.device, step=args.step, weights=args.weights)
    _, loader = split_loader(tok.config, args.split, args.batch_size, limit=args.num, num_workers=args.num_workers)
    originals, recons = [], []
    for images, _ in loader:
        x = tok.prepare(images)
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


def cmd_probe(args: argparse.Namespace) -> int:
    """Fit a fresh causal probe on the frozen tokenizer's latents; write held-out errors as JSON."""
    from twostage.tokenizers.vq.probe import probe_run

    path, record = probe_run(args.run, train_images=args.train_images, val_images=args.val_images, steps=args.steps,
                             batch_size=args.batch_size, seed=args.seed, device=args.device,
                             num_workers=args.num_workers, step=args.step, weights=args.weights, out=args.out)
    for view, r in record["views"].items():
        print(f"{view:9s} probe error: val {r['val_error']:.4f}  train {r['train_error']:.4f}  "
              f"({r['train_images']} train / {r['val_images']} val images, {r['steps']} steps)")
    print(f"wrote {path}")
    return 0
