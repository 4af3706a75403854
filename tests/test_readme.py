"""The README's Python API script runs as written (in a temporary folder), and its layout table names
every package folder and top-level module that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.slow
def test_the_api_script_runs(tmp_path):
    (script,) = _python_blocks()
    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FD-EffNetLite0" in result.stdout and "PSNR" in result.stdout
    assert (tmp_path / "runs/api/samples.npz").is_file()


def test_layout_table_matches_the_tree():
    table = README[README.index("## Layout"):README.index("## Python API")]
    named = set(re.findall(r"`(twostage/[\w/.]*)`", table))
    package = ROOT / "twostage"
    folders = {f"twostage/{p.relative_to(package)}/" for p in package.rglob("*")
               if p.is_dir() and p.name != "__pycache__"}
    assert folders <= named, f"folders missing from the README layout: {sorted(folders - named)}"
    for path in named:
        assert (ROOT / path.rstrip("/")).exists(), f"the README layout names {path}, which does not exist"
