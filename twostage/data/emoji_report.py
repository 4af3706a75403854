"""`twostage data info emoji` / `data prepare emoji`: counts per split, class and style, the sources with
their versions, licences and locations, what was skipped, and one sample grid PNG per style.

    twostage data info emoji                   # 64 px (builds and caches 64 and 32 px on the first run)
    twostage data prepare emoji --image-size 32
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from twostage.data.emoji import EmojiSet, load, write_bundle
from twostage.data.fashion_mnist import cache_dir

GRID_PER_CLASS = 8  # one grid row per class


def write_grids(ds: EmojiSet, folder: str | Path | None = None) -> dict[str, Path]:
    """Per style, a PNG with one row per class of up to 8 train images (a fixed seeded pick)."""
    from PIL import Image

    folder = Path(folder) if folder is not None else cache_dir() / "emoji" / "grids"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels, styles = ds.split("train")
    size, pad = ds.image_size, 2
    out = {}
    for s, style in enumerate(ds.style_names):
        rng = np.random.default_rng(s)
        rows = []
        for c in range(len(ds.class_names)):
            idx = np.flatnonzero((styles == s) & (labels == c))
            rows.append(np.sort(rng.choice(idx, min(GRID_PER_CLASS, len(idx)), replace=False)))
        grid = np.full((len(rows) * (size + pad) + pad, GRID_PER_CLASS * (size + pad) + pad, 3), 255, np.uint8)
        for r, idx in enumerate(rows):
            for c, i in enumerate(idx):
                y, x = pad + r * (size + pad), pad + c * (size + pad)
                grid[y : y + size, x : x + size] = images[i]
        path = folder / f"{re.sub(r'[^a-z0-9]+', '-', style.lower()).strip('-')}-{size}px.png"
        Image.fromarray(grid).save(path)
        out[style] = path
    return out


def report(ds: EmojiSet, grids: dict[str, Path]) -> list[str]:
    """The lines `data info emoji` prints."""
    parts = {split: ds.split(split) for split in ("train", "test")}
    n = {split: len(p[1]) for split, p in parts.items()}
    test_fraction = n["test"] / max(1, n["train"] + n["test"])
    size = ds.image_size
    lines = [
        "dataset:      emoji (colour emoji of four art styles, composited on white)",
        f"train:        {n['train']} images",
        f"val:          {n['test']} images (= the test split: {test_fraction:.1%} of the images, whole emoji held "
        f"out by base code point, every style and variant on one side)",
        f"image shape:  {size}x{size}x3 stored (HxWxC, uint8; Lanczos-resized)",
        f"model input:  3x{size}x{size} (CxHxW float32 in [-1, 1])",
        f"classes:      {len(ds.class_names)} Unicode emoji groups (the label); the style is a second label "
        f"(EmojiDataset.styles)",
    ]
    width = max(len(c) for c in ds.class_names)
    short = [s.split()[0] for s in ds.style_names]
    head = f"  {'':<{width}}  {'train':>6} {'test':>6}  " + " ".join(f"{s:>9}" for s in short)
    lines += ["counts:       per class (train / test) and per style (both splits)", head]
    all_labels = np.concatenate([parts["train"][1], parts["test"][1]])
    all_styles = np.concatenate([parts["train"][2], parts["test"][2]])
    for c, name in enumerate(ds.class_names):
        per_style = " ".join(f"{int(np.sum((all_labels == c) & (all_styles == s))):>9}" for s in range(len(short)))
        lines.append(f"  {name:<{width}}  {int(np.sum(parts['train'][1] == c)):>6} "
                     f"{int(np.sum(parts['test'][1] == c)):>6}  {per_style}")
    totals = " ".join(f"{int(np.sum(all_styles == s)):>9}" for s in range(len(short)))
    lines.append(f"  {'total':<{width}}  {n['train']:>6} {n['test']:>6}  {totals}")
    lines.append("sources:")
    for src in ds.sources:
        lines.append(f"  {src['style']}: {src['package']} {src['version']} ({src['client']}), licence "
                     f"{src['license']}")
        lines.append(f"      files: {src['where']}")
    lines.append("labels:       " + "; ".join(ds.groups_from))
    lines.append("skipped:")
    for style, reasons in ds.skipped.items():
        for reason, count in reasons.items():
            examples = ds.skipped_examples.get(f"{style}: {reason}", [])
            shown = ", ".join(Path(e).name if "/" in e else e for e in examples[:3])
            lines.append(f"  {style}: {count} {reason}" + (f" (e.g. {shown})" if shown else ""))
        if not reasons:
            lines.append(f"  {style}: none")
    lines.append("grids:")
    lines += [f"  {style}: {path}" for style, path in grids.items()]
    lines += [f"note:         {action}" for action in ds.actions]
    if ds.cache_file is not None:
        lines.append(f"cache:        {ds.cache_file}")
    return lines


def cmd_info(root: str | None, image_size: int) -> int:
    ds = load(image_size, root)
    print("\n".join(report(ds, write_grids(ds))))
    return 0


def cmd_prepare(root: str | None, image_size: int, bundle: str | None = None) -> int:
    ds = load(image_size, root)
    for action in ds.actions or ["nothing to do"]:
        print(f"- {action}")
    if bundle is not None:
        path = write_bundle(ds, bundle, root)
        print(f"- wrote the portable bundle {path} ({path.stat().st_size / 1e6:.1f} MB): on a machine without the "
              f"sources, TWOSTAGE_EMOJI_ARRAYS={Path(bundle)} makes `emoji` read it")
    grids = write_grids(ds)
    for style, path in grids.items():
        print(f"- sample grid of {style}: {path}")
    n_train, n_test = len(ds.split("train")[1]), len(ds.split("test")[1])
    print(f"emoji ready: {n_train} train / {n_test} val (test) images at {ds.image_size} px, "
          f"{len(ds.class_names)} classes, {len(ds.style_names)} styles")
    return 0


__all__ = ["cmd_info", "cmd_prepare", "report", "write_grids"]
