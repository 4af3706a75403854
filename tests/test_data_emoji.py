"""The emoji dataset's core pipeline on a miniature source folder made by the test (twostage/data/emoji_fixture.py):
code point keys and the split by base emoji, compositing and resizing, labels, the build, the decoded cache.

Runs offline and without the `emoji` extra: the fixture's PNG sources (Twemoji, EmojiOne 2) need Pillow only,
labels come from the fixture's openmoji.json; Noto's font needs fontTools (a matplotlib dependency)."""

from __future__ import annotations

import importlib.util
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from twostage.data import emoji
from twostage.data.emoji_fetch import SOURCES, locate
from twostage.data.emoji_fixture import FIXTURE_EMOJI, colour, write_fixture
from twostage.data.emoji_groups import (_OPENMOJI_GROUPS, GROUPS, GroupTable, add_openmoji_json, base_key, emoji_key,
                                        in_test_split, parse_codes)
from twostage.data.errors import DataError

HAS_FONTTOOLS = importlib.util.find_spec("fontTools") is not None
GROUP_OF = {emoji_key(codes): group for codes, group in FIXTURE_EMOJI}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("emoji") / "src", font=HAS_FONTTOOLS)


def _sources(root, names=("twemoji", "emojione")):
    return {n: locate(SOURCES[n], root, fetch=False, actions=[]) for n in names}


def _table(root) -> GroupTable:
    table = GroupTable()
    add_openmoji_json(table, root / "openmoji" / "data" / "openmoji.json")
    return table


def test_keys_normalise_spellings_and_variants_share_a_base():
    assert emoji_key(parse_codes("1f44d-1f3fd")) == emoji_key(parse_codes("1F44D-1F3FD")) == "1F44D-1F3FD"
    assert emoji_key(parse_codes("23-fe0f-20e3")) == "0023-20E3"  # FE0F dropped, 4 digits
    assert parse_codes("1F468_200D_1F4BB", "_") == (0x1F468, 0x200D, 0x1F4BB)
    for bad in ("", "xyz", "110000", "1F600--1F601"):
        with pytest.raises(DataError):
            parse_codes(bad)
    # skin tones, hair, gender signs, man / woman, "facing right": all variants of one base emoji
    assert base_key((0x1F44D, 0x1F3FF)) == base_key((0x1F44D,)) == "1F44D"
    assert base_key((0x1F468, 0x200D, 0x1F4BB)) == base_key((0x1F469, 0x1F3FD, 0x200D, 0x1F4BB)) == "1F9D1-200D-1F4BB"
    assert base_key((0x1F3C3, 0x200D, 0x2642, 0xFE0F)) == base_key((0x1F3C3, 0x200D, 0x27A1, 0xFE0F)) == "1F3C3"
    assert base_key((0x1F468, 0x200D, 0x1F9B0)) == "1F9D1"
    assert base_key((0x1F1EB, 0x1F1F7)) != base_key((0x1F1EF, 0x1F1F5))  # flags stay apart
    assert base_key((0x1F3FB,)) == "1F3FB"  # a bare modifier keeps its own key rather than an empty one


def test_split_is_a_stable_hash_of_the_base_emoji():
    rng = np.random.default_rng(0)
    seqs = [(int(c),) for c in rng.choice(np.arange(0x10000, 0x1FFFF), 3000, replace=False)]
    picked = [in_test_split(s, 0.15) for s in seqs]
    assert 0.12 < np.mean(picked) < 0.18  # the fraction is met
    assert picked == [in_test_split(s, 0.15) for s in seqs]  # deterministic
    assert all(in_test_split(s, 0.3) for s, p in zip(seqs, picked) if p)  # a larger fraction only adds emoji
    for codes, _ in FIXTURE_EMOJI:  # a variant is always on its base's side
        for tone in range(0x1F3FB, 0x1F400):
            assert in_test_split((codes[0], tone), 0.5) == in_test_split(codes[:1], 0.5)


def test_compose_composites_before_resizing_and_pads_to_square():
    # Red, opaque in the middle, with fully transparent *black* pixels around: resized without
    # compositing first, the black would bleed into the edge and pull the red channel below 255.
    arr = np.zeros((128, 136, 4), np.uint8)
    arr[32:96, 40:96] = (255, 0, 0, 255)
    arr[20:32, 40:96] = (255, 0, 0, 128)  # a half-transparent band
    out64, out32 = emoji.compose(Image.fromarray(arr, "RGBA"), (64, 32), (255, 255, 255))
    assert out64.shape == (64, 64, 3) and out32.shape == (32, 32, 3) and out64.dtype == np.uint8
    assert (out64[..., 0] == 255).all() and (out32[..., 0] == 255).all()  # red everywhere: no dark fringe
    assert (out64[:3] == 255).all() and (out64[:, :3] == 255).all()  # padded rows / columns are background
    assert out64[32, 32, 1] < 10  # the centre is red
    band = out64[13, 34]  # the half-transparent band: halfway between red and white
    assert 100 < band[1] < 160 and band[1] == band[2]


def test_group_table_labels_and_leaves_out_components_and_extras(fixture_root, tmp_path):
    table = _table(fixture_root)
    assert table.label((0x1F600,)) == GROUPS.index("Smileys & Emotion")
    assert table.label((0x2764,)) == table.label((0x2764, 0xFE0F)) == 0  # looked up without FE0F
    assert table.label((0x1F1EB, 0x1F1F7)) == GROUPS.index("Flags")
    assert table.label((0xE000,)) is None and table.label((0x1F1E6,)) is None  # an OpenMoji extra, not listed
    table.add((0x1F3FB,), "Component")
    table.add((0x1F600,), "Flags")  # a later source never overrides an earlier one
    assert table.label((0x1F3FB,)) is None and table.label((0x1F600,)) == 0
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="openmoji.json"):
        add_openmoji_json(GroupTable(), tmp_path / "bad.json")


def _check_build(built, n_styles):
    a = built["arrays"]
    n_emoji = len(FIXTURE_EMOJI)
    assert len(a["train_labels"]) + len(a["test_labels"]) >= n_emoji * n_styles
    assert len(a["test_labels"]) > 0 and len(a["train_labels"]) > 0
    train_bases = {base_key(parse_codes(k)) for k in a["train_codes"]}
    test_bases = {base_key(parse_codes(k)) for k in a["test_codes"]}
    assert not train_bases & test_bases  # no emoji, in any style or variant, on both sides
    for split in ("train", "test"):
        for key, label, img in zip(a[f"{split}_codes"], a[f"{split}_labels"], a[f"{split}_images"]):
            if key in GROUP_OF:  # labelled by its group; drawn in its colour, centred on white
                assert GROUPS[label] == _OPENMOJI_GROUPS[GROUP_OF[key]]
                assert (img[0, 0] == 255).all()
                centre = img[img.shape[0] // 2, img.shape[1] // 2]
                assert np.abs(centre.astype(int) - colour(parse_codes(key))).max() <= 3 or \
                    (centre == 255).all()  # EmojiOne's ring is hollow


def test_build_png_sources_labels_splits_and_counts_skips(fixture_root):
    sources = _sources(fixture_root)
    cfg = emoji.EmojiBuildConfig(sizes=(64, 32), test_fraction=0.5)
    built = emoji.build(sources, cfg, _table(fixture_root))
    _check_build(built[64], n_styles=2)
    a64, a32 = built[64]["arrays"], built[32]["arrays"]
    assert a64["train_images"].shape[1:] == (64, 64, 3) and a32["train_images"].shape[1:] == (32, 32, 3)
    assert np.array_equal(a64["train_labels"], a32["train_labels"])  # one pass: the same rows at both sizes
    styles = set(a64["train_styles"]) | set(a64["test_styles"])
    assert styles == {emoji.STYLES.index("Twemoji"), emoji.STYLES.index("EmojiOne 2")}
    skipped = built[64]["provenance"]["skipped"]
    assert skipped["Twemoji"] == {"blank (fully transparent)": 1, "unreadable (UnidentifiedImageError)": 1,
                                  "no Unicode emoji group (not an RGI emoji, a skin-tone swatch, or an OpenMoji "
                                  "extra)": 1}
    assert skipped["EmojiOne 2"]["PNG not listed in index.json"] == 1
    again = emoji.build(sources, cfg, _table(fixture_root))[64]["arrays"]
    assert all(np.array_equal(a64[k], again[k]) for k in a64)  # deterministic
    # every image of one split is sorted by (style, emoji): the order does not depend on the file system
    order = list(zip(a64["train_styles"], a64["train_codes"]))
    assert order == sorted(order)
    with pytest.raises(DataError, match="at most|8..64"):
        emoji.build(sources, emoji.EmojiBuildConfig(sizes=(128,)), _table(fixture_root))


@pytest.mark.skipif(not HAS_FONTTOOLS, reason="fontTools not installed: Noto's CBDT font cannot be read")
def test_noto_font_glyphs_reach_their_sequences_through_cmap_and_ligatures(fixture_root):
    from twostage.data.emoji_sources import noto

    drawings, skipped = noto(_sources(fixture_root, ("noto",))["noto"])
    by_seq = {c: d for d in drawings for c in d.candidates}
    for codes, _ in FIXTURE_EMOJI:  # every fixture emoji, single or sequence (FE0F-less), has its glyph
        seq = tuple(c for c in codes if c != 0xFE0F)
        assert seq in by_seq, seq
        img = Image.open(io.BytesIO(by_seq[seq].data))
        assert img.size == (136, 128)
    built = emoji.build(_sources(fixture_root, ("noto",)), emoji.EmojiBuildConfig(sizes=(32,), test_fraction=0.5),
                        _table(fixture_root))
    _check_build(built[32], n_styles=1)


def test_decoded_cache_round_trip_and_key(fixture_root, tmp_path, caplog):
    sources = _sources(fixture_root)
    cfg = emoji.EmojiBuildConfig(sizes=(32,))
    built = emoji.build(sources, cfg, _table(fixture_root))[32]
    path = tmp_path / f"decoded-32px-{emoji.cache_key(sources, cfg)}.npz"
    assert emoji._write_cache(path, built) and oct(path.stat().st_mode)[-3:] == "644"
    back = emoji._read_cache(path)
    assert back["provenance"] == built["provenance"]
    assert all(np.array_equal(back["arrays"][k], built["arrays"][k]) for k in built["arrays"])
    stale = tmp_path / "decoded-32px-000000000000.npz"
    stale.write_bytes(b"")
    emoji._write_cache(path, built)
    assert not stale.exists()  # a stale build of the same size is removed
    path.write_bytes(b"PK\x03\x04 truncated")
    assert emoji._read_cache(path) is None and "unreadable" in caplog.text
    key = emoji.cache_key(sources, cfg)
    assert emoji.cache_key(sources, emoji.EmojiBuildConfig(sizes=(32,), test_fraction=0.2)) != key
    assets = sources["twemoji"].assets
    Image.new("RGBA", (72, 72), (9, 9, 9, 255)).save(assets / "1f680.png")  # a source gains a file
    assert emoji.cache_key(sources, cfg) != key
    (assets / "1f680.png").unlink()
    # the same sources unpacked elsewhere, later: the same key (it names the dataset in protocols)
    again = tmp_path / "elsewhere"
    shutil.copytree(fixture_root, again)  # new paths and new directory times
    assert emoji.cache_key(_sources(again), cfg) == key
