"""Importing a peer project's modules as they are at one commit, for the golden-output scripts here.

The files are taken out of a git directory (a clone, or a bare mirror such as the one `fetch` makes) with
`git show COMMIT:PATH` into a temporary folder, keeping their paths, so the peer's own imports between
them work; nothing of the peer is committed to this repository.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Sequence


def load_peer(git_dir: Path, rev: str, files: Sequence[str], module: str) -> tuple[ModuleType, str]:
    """(the peer module `module` (dotted, e.g. "autoregressive.models.gpt") imported from `files` at `rev`,
    the full commit hash)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", f"{rev}^{{commit}}").strip()
    root = Path(tempfile.mkdtemp())
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(git("show", f"{commit}:{name}"))
    sys.path.insert(0, str(root))
    return importlib.import_module(module), commit
