"""Reader (and a small writer, for tests) of the idx format used by MNIST and Fashion-MNIST.

Layout (big-endian): 2 zero bytes, one dtype byte (0x08 = uint8, ...), one byte with the number of
dimensions, then one uint32 per dimension, then the data in C order. Files are usually gzipped.
We parse it ourselves (no torchvision dependency) and validate everything a damaged download can
break: the magic bytes, the dtype, the dimension count and that the payload has exactly the size the
header promises, so a truncated file fails loudly instead of yielding a short or garbled array.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from twostage.data.errors import DataError

# idx dtype byte -> numpy dtype (big-endian where it matters).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: code for code, dt in _DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when it is gzip data (detected by magic, not by name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{path}: the gzip stream is truncated or corrupt ({err}). Delete the file and fetch it "
            "again (e.g. `twostage data prepare fashion-mnist`)."
        ) from None


def read_idx(path: str | Path, *, ndim: int | None = None, dtype: np.dtype | None = None) -> np.ndarray:
    """Parse an idx (or idx.gz) file into a native-endian numpy array.

    `ndim` / `dtype`, when given, are checked too: an images file must have 3 dimensions, a labels
    file 1, both uint8.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such idx file")
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes; an idx file starts with a 4-byte header")
    zero, code, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES:
        raise DataError(
            f"{path}: not an idx file (magic bytes {data[:4].hex()}; expected 0000 followed by a "
            f"dtype byte in {sorted(hex(c) for c in _DTYPES)} and the number of dimensions)"
        )
    if nd == 0:
        raise DataError(f"{path}: the idx header declares 0 dimensions")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes, the header alone needs {header})")
    shape = struct.unpack(f">{nd}I", data[4:header])
    dt = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{path}: the file is {what}: the header declares shape {shape} ({expected} data bytes) "
            f"but {got} bytes follow it. Delete the file and fetch it again."
        )
    if ndim is not None and nd != ndim:
        raise DataError(f"{path}: expected a {ndim}-dimensional idx array, the header says shape {shape}")
    if dtype is not None and dt != np.dtype(dtype):
        raise DataError(f"{path}: expected dtype {np.dtype(dtype)}, the header says {dt}")
    arr = np.frombuffer(data, dtype=dt, offset=header).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=True)  # native order, writable, owns its memory


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write `array` as an idx file (gzipped when the name ends in .gz, unless `compress` says)."""
    path = Path(path)
    arr = np.ascontiguousarray(array)
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    if dt not in _CODES:
        raise DataError(f"idx cannot store dtype {arr.dtype}; use one of {sorted(map(str, _CODES))}")
    header = struct.pack(">HBB", 0, _CODES[dt], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(dt, copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


__all__ = ["read_idx", "write_idx"]
