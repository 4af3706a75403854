"""The decoded emoji arrays as one portable file, for machines that cannot fetch the four sources.

    twostage data prepare emoji --bundle .carry/emoji     # here: writes .carry/emoji/emoji-64px-<key>.npz.xz
    TWOSTAGE_EMOJI_ARRAYS=.carry/emoji twostage ...       # there: emoji.load reads it and fetches nothing

A machine without package registries (a lent GPU host, a cluster node behind a firewall) cannot run the
fetch chain of emoji_fetch.py, and the dataset is built from four packages. The bundle holds exactly
what the local cache holds for one image size (the arrays of both splits, their provenance) plus the
cache key and the source records, so statistics computed from it carry the same content id
(`emoji.content_id`) as those computed from the sources. It is an .npz compressed with xz: 24 MB at
64 px, against 168 MB raw and 36 MB with the npz format's own deflate, which lets it travel in a
64 MiB upload beside the feature network's wheels.
"""

from __future__ import annotations

import io
import json
import lzma
import os
from pathlib import Path
from typing import Any

import numpy as np

from twostage.common.atomic import atomic_write
from twostage.data.errors import DataError

ENV = "TWOSTAGE_EMOJI_ARRAYS"  # a folder of bundles; when set, emoji.load reads from it only
SUFFIX = ".npz.xz"


def bundle_name(image_size: int, key: str) -> str:
    return f"emoji-{image_size}px-{key}{SUFFIX}"


def write_bundle(folder: str | Path, image_size: int, key: str, arrays: dict[str, np.ndarray],
                 provenance: dict[str, Any], sources: list[dict]) -> Path:
    """One size's arrays with their provenance, cache key and source records, as FOLDER/emoji-<S>px-<key>.npz.xz
    (a bundle of the same size with another key is replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"emoji-{image_size}px-*{SUFFIX}"):
        if old.name != bundle_name(image_size, key):
            old.unlink()
    meta = {"image_size": image_size, "key": key, "provenance": provenance, "sources": sources}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    path = folder / bundle_name(image_size, key)
    with atomic_write(path, "wb") as fh:
        fh.write(lzma.compress(buffer.getvalue(), preset=6))
    return path


def find_bundle(image_size: int) -> Path | None:
    """The bundle of this size in $TWOSTAGE_EMOJI_ARRAYS, None when the variable is unset; a DataError
    naming the folder and the fix when it is set but holds none (or several)."""
    folder = os.environ.get(ENV)
    if not folder:
        return None
    found = sorted(Path(folder).glob(f"emoji-{image_size}px-*{SUFFIX}"))
    if len(found) != 1:
        what = "no bundle" if not found else f"{len(found)} bundles"
        raise DataError(f"${ENV}={folder} holds {what} of the emoji arrays at {image_size} px "
                        f"(emoji-{image_size}px-<key>{SUFFIX}); write one with `twostage data prepare emoji "
                        f"--image-size {image_size} --bundle {folder}` where the sources can be fetched, "
                        f"or unset {ENV} to build from the sources")
    return found[0]


def read_bundle(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta: image_size, key, provenance, sources) of a bundle file."""
    try:
        with lzma.open(path) as fh, np.load(io.BytesIO(fh.read()), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except (OSError, lzma.LZMAError, ValueError, KeyError) as err:
        raise DataError(f"{path} is not a readable emoji bundle ({err}); write it again with "
                        "`twostage data prepare emoji --bundle FOLDER`") from None
    return arrays, meta


__all__ = ["ENV", "bundle_name", "write_bundle", "find_bundle", "read_bundle"]
