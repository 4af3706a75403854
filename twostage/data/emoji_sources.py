"""Reading the four emoji art styles: which drawings a source holds, and each drawing as an RGBA image.

  Twemoji     PNG files named by their code points ("1f44d-1f3fd.png": no FE0F, no leading zeros)
  Noto        the PNG strikes of the font's CBDT table; a glyph's code points come from the cmap (single
              code points) and from the GSUB ligatures (sequences: ZWJ, flags, keycaps, skin tones)
  OpenMoji    SVG files named by their code points ("1F44D-1F3FD.svg"), rendered with cairosvg
  EmojiOne 2  PNG files listed in gemojione's config/index.json ("unicode" + "unicode_alternates")

A drawing may stand for several sequences (a Noto glyph reached from two code points, an EmojiOne entry
with alternates); they are its `candidates`, and the dataset labels it by the first that has a group.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from twostage.data.emoji_fetch import LocatedSource, require
from twostage.data.emoji_groups import parse_codes
from twostage.data.errors import DataError

Codes = tuple[int, ...]


@dataclass(frozen=True)
class Drawing:
    """One picture of one source: where it is and which code sequences it may stand for (preferred first).
    Plain data, so that worker processes can render drawings."""

    candidates: tuple[Codes, ...]
    origin: str  # a file path or "NotoColorEmoji.ttf glyph NAME": for the list of skipped drawings
    file_format: str  # "png" | "svg"
    path: str | None = None
    data: bytes | None = None  # the PNG bytes of a font glyph


Extracted = tuple[list[Drawing], Counter]  # the drawings, and why others were skipped (reason -> count)


def _named_files(folder: Path, suffix: str, file_format: str, sep: str = "-") -> Extracted:
    drawings, skipped = [], Counter()
    for path in sorted(folder.glob(f"*{suffix}")):
        try:
            codes = parse_codes(path.name[: -len(suffix)], sep)
        except DataError:
            skipped["file name is not a code point sequence"] += 1
            continue
        drawings.append(Drawing((codes,), str(path), file_format, path=str(path)))
    if not drawings:
        raise DataError(f"{folder} holds no {suffix} files named by code points; delete it to fetch it again")
    return drawings, skipped


def twemoji(src: LocatedSource) -> Extracted:
    return _named_files(src.assets, ".png", "png")


def openmoji(src: LocatedSource) -> Extracted:
    return _named_files(src.assets, ".svg", "svg")


def emojione(src: LocatedSource) -> Extracted:
    """The PNGs that gemojione's index.json lists; PNGs it does not list are skipped and counted."""
    index_path = src.assets.parent.parent / "config" / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{index_path}: gemojione's index is unreadable ({err}); delete {src.root} to fetch it again")
    drawings, skipped, listed = [], Counter(), set()
    for entry in sorted(index.values(), key=lambda e: str(e.get("unicode", ""))):
        path = src.assets / f"{str(entry.get('unicode', '')).upper()}.png"
        try:
            codes = [parse_codes(entry["unicode"])] + [parse_codes(a) for a in entry.get("unicode_alternates") or []]
        except (DataError, KeyError, AttributeError):
            skipped["index entry without a code point sequence"] += 1
            continue
        if not path.is_file():
            skipped["listed in index.json, no PNG file"] += 1
            continue
        listed.add(path.name)
        drawings.append(Drawing(tuple(codes), str(path), "png", path=str(path)))
    skipped["PNG not listed in index.json"] += sum(1 for p in src.assets.glob("*.png") if p.name not in listed)
    return drawings, +skipped


def _ligature_subtables(lookup):
    """The ligature subtables of a GSUB lookup (type 4, or type 7 extensions wrapping type 4)."""
    for sub in lookup.SubTable:
        if lookup.LookupType == 7 and getattr(sub, "ExtensionLookupType", None) == 4:
            yield sub.ExtSubTable
        elif lookup.LookupType == 4:
            yield sub


def glyph_sequences(font) -> dict[str, list[Codes]]:
    """glyph name -> the code point sequences that the font draws with it (cmap, then GSUB ligatures)."""
    cmap = font.getBestCmap() or {}
    sequences: dict[str, list[Codes]] = {}
    first_code: dict[str, int] = {}
    for cp, glyph in sorted(cmap.items()):
        sequences.setdefault(glyph, []).append((cp,))
        first_code.setdefault(glyph, cp)  # a component glyph stands for its lowest code point
    if "GSUB" in font:
        for lookup in font["GSUB"].table.LookupList.Lookup:
            for sub in _ligature_subtables(lookup):
                for first, ligatures in sorted(sub.ligatures.items()):
                    for lig in ligatures:
                        parts = [first, *lig.Component]
                        if all(p in first_code for p in parts):  # parts made by other lookups: not a sequence
                            sequences.setdefault(lig.LigGlyph, []).append(tuple(first_code[p] for p in parts))
    return sequences


def noto(src: LocatedSource) -> Extracted:
    """Every glyph of the font's largest CBDT strike that stores a PNG, with its code point sequences."""
    ttlib = require("fontTools.ttLib")
    try:
        font = ttlib.TTFont(str(src.assets))
        if "CBDT" not in font or "CBLC" not in font:
            raise DataError(f"{src.assets} has no CBDT/CBLC colour bitmap tables (a COLRv1 build of Noto Color "
                            f"Emoji?); this dataset reads the bitmap font of Debian's fonts-noto-color-emoji")
        sizes = [s.bitmapSizeTable.ppemY for s in font["CBLC"].strikes]
        strike = font["CBDT"].strikeData[max(range(len(sizes)), key=sizes.__getitem__)]
        sequences = glyph_sequences(font)
        drawings, skipped = [], Counter()
        for glyph in sorted(strike.keys()):
            data = getattr(strike[glyph], "imageData", None)
            if not data or not data.startswith(b"\x89PNG"):
                skipped["glyph bitmap is not a PNG"] += 1
            elif glyph not in sequences:
                skipped["glyph reached by no code point sequence"] += 1
            else:
                drawings.append(Drawing(tuple(sequences[glyph]), f"{src.assets.name} glyph {glyph}", "png", data=data))
    except DataError:
        raise
    except Exception as err:  # fontTools raises many types (struct.error, AssertionError, ...) on a damaged font
        raise DataError(f"{src.assets}: not a readable font ({type(err).__name__}: {err}); delete {src.root} to "
                        f"fetch it again") from None
    return drawings, skipped


EXTRACTORS = {"twemoji": twemoji, "noto": noto, "openmoji": openmoji, "emojione": emojione}


def extract(src: LocatedSource) -> Extracted:
    return EXTRACTORS[src.spec.name](src)


def load_rgba(drawing: Drawing, svg_px: int) -> Image.Image:
    """The drawing as an RGBA image (SVGs rendered at svg_px x svg_px). Raises on an unreadable file."""
    if drawing.file_format == "svg":
        cairosvg = require("cairosvg")
        png = cairosvg.svg2png(url=drawing.path, output_width=svg_px, output_height=svg_px)
        img = Image.open(io.BytesIO(png))
    else:
        img = Image.open(io.BytesIO(drawing.data) if drawing.data is not None else drawing.path)
    img.load()  # decode now, so that a truncated file fails here and is counted
    return img.convert("RGBA")


__all__ = ["Drawing", "EXTRACTORS", "extract", "glyph_sequences", "load_rgba"]
