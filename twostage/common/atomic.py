"""Files that appear complete or not at all, even when several processes write the same one.

A study runs many jobs at once, and the first evaluations of a protocol all compute the same cached
file (reference statistics, feature statistics) at the same moment. A shared temporary name
(`stats.npz.part`) lets one writer rename the other's half-written file away, and the other then fails
on its own rename (seen on an H200 with 8 jobs per GPU). Each write therefore goes to a temporary file
of its own in the target's folder (same file system, so the final `os.replace` is atomic), and the last
complete writer wins: every writer wrote the same content.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
    """Open a private temporary file next to `path`; on a clean exit it replaces `path`, on an error it
    is removed and `path` is left as it was. `fsync` forces the bytes to disk before the rename (for
    files whose loss after a power cut would cost work: checkpoints' small state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name no other writer (process or thread) uses; opened normally, so the umask sets its permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.part")
    try:
        with open(tmp, mode.replace("w", "x")) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> None:
    with atomic_write(path, "w", fsync=fsync) as fh:
        fh.write(text)


__all__ = ["atomic_write", "write_text_atomic"]
