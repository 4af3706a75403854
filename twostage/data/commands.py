"""`twostage data info NAME` and `twostage data prepare NAME`.

    twostage data info fashion-mnist            # counts, shapes, classes, where the files came from
    twostage data info folder --root /data/imagenet --val-fraction 0.01 --scan
    twostage data prepare fashion-mnist         # fetch (apt-get download / URLs), decode, cache
    twostage data info emoji                    # + counts per class and style, sources, sample grids

Both return an exit code (0 ok, 1 data problem) and print data problems as one clear message.
"""

from __future__ import annotations

import argparse

from twostage.config import validate
from twostage.data import fashion_mnist
from twostage.data.build import describe
from twostage.data.config import DATASET_NAMES, DataConfig
from twostage.data.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group to the top-level CLI."""
    data = subparsers.add_parser("data", help="inspect and prepare datasets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    info = sub.add_parser("info", help="counts per split, image shape, classes, where the files came from")
    _common(info)
    info.add_argument("--scan", action="store_true", help="decode every image of a folder dataset and list unreadable ones")
    info.set_defaults(func=cmd_info)

    prep = sub.add_parser("prepare", help="fetch, decode and cache a dataset so training starts at once")
    _common(prep)
    prep.add_argument("--bundle", metavar="FOLDER", help="emoji: also write the decoded arrays as one portable "
                      "file there, for machines that cannot fetch the sources (read with TWOSTAGE_EMOJI_ARRAYS)")
    prep.set_defaults(func=cmd_prepare)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=DATASET_NAMES, help="dataset kind")
    p.add_argument("--root", help="fashion-mnist: folder with the idx files; emoji: folder with the four sources "
                                  "(laid out like the cache); folder: image root; npz: .npz file or folder")
    p.add_argument("--val-fraction", type=float, default=0.0, help="folder/npz without a val set: fraction held out")
    p.add_argument("--image-size", type=int, help="model input size (for the output shape shown; default 32, "
                                                   "emoji: 64)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--resize", default="pad", choices=("pad", "resize_crop"))


def _config(args: argparse.Namespace) -> DataConfig:
    cfg = DataConfig(
        name=args.name, root=args.root, image_size=args.image_size or (64 if args.name == "emoji" else 32),
        channels=args.channels,
        resize=args.resize, val_fraction=args.val_fraction,
    )  # fmt: skip
    validate(cfg, "data")
    return cfg


def cmd_info(args: argparse.Namespace) -> int:
    """Print what `build_dataset` would give for this dataset."""
    if args.name == "emoji":  # per class and style, sources and licences, sample grids
        from twostage.data import emoji_report

        cfg = _config(args)
        return emoji_report.cmd_info(cfg.root, cfg.image_size)
    info = describe(_config(args), scan=args.scan)
    h, w, c = info.image_shape
    print(f"dataset:      {info.name}")
    print(f"source:       {info.source}")
    for split, count in info.splits.items():
        print(f"{split + ':':<13} {count} images")
    print(f"image shape:  {h}x{w}x{c} stored (HxWxC, uint8{', first image' if info.name == 'folder' else ''})")
    print(f"model input:  {'x'.join(map(str, info.output_shape))} (CxHxW float32 in [-1, 1], resize={args.resize})")
    names = info.class_names
    shown = ", ".join(names if len(names) <= 20 else [*names[:10], "...", *names[-3:]])
    print(f"classes:      {len(names)} ({shown})")
    for note in info.notes:
        print(f"note:         {note}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Fetch, decode and cache (fashion-mnist); list and check a folder or npz file (others)."""
    cfg = _config(args)
    if args.bundle is not None and cfg.name != "emoji":
        raise DataError(f"--bundle is for emoji (four sources to fetch); {cfg.name} needs none: copy its files")
    if cfg.name == "emoji":
        from twostage.data import emoji_report

        return emoji_report.cmd_prepare(cfg.root, cfg.image_size, args.bundle)
    if cfg.name == "fashion-mnist":
        fm = fashion_mnist.load(cfg.root)
        for action in fm.actions or ["nothing to do"]:
            print(f"- {action}")
        print(f"fashion-mnist ready: {len(fm.train_labels)} train / {len(fm.test_labels)} val images from {fm.source}")
        return 0
    # Folders and npz files need no preparation beyond being readable: list them and say so.
    info = describe(cfg, scan=cfg.name == "folder")
    for note in info.notes:
        print(f"- {note}")
    counts = " / ".join(f"{n} {s}" for s, n in info.splits.items())
    print(f"{cfg.name} ready: {counts} images, {len(info.class_names)} classes, from {info.source}")
    return 0


__all__ = ["cmd_info", "cmd_prepare", "register"]
