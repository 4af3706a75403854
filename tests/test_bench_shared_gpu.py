"""benchmarks/bench_tokenizer_run.py's aggregate throughput of K runs sharing a GPU counts only the span in
which all of them trained: a run that trains while the others still compile has the GPU to itself, and
its own step times would overstate what K runs get together."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_tokenizer_run import common_window, step_at  # noqa: E402


def _run(folder: Path, rows: list[tuple[float, int]]) -> Path:
    folder.mkdir()
    lines = [json.dumps({"step": s, "time": t, "perf/step_time_s": 0.01}) for t, s in rows]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_step_at_interpolates_between_log_rows():
    rows = [(0.0, 0), (10.0, 100), (20.0, 300)]
    assert step_at(rows, 5.0) == pytest.approx(50.0)
    assert step_at(rows, 15.0) == pytest.approx(200.0)
    with pytest.raises(ValueError):
        step_at(rows, 25.0)


def test_the_window_starts_when_the_last_run_has_compiled_and_ends_when_the_first_finishes(tmp_path):
    # run a compiles quickly and trains alone at 50 steps/s from t=10 to t=20; from t=20 both share the
    # GPU at 25 steps/s each; run b's first window ends at t=25, a finishes at t=50
    a = _run(tmp_path / "a", [(10, 0), (20, 500), (30, 750), (40, 1000), (50, 1250)])
    b = _run(tmp_path / "b", [(20, 0), (25, 125), (30, 250), (40, 500), (50, 750), (60, 1250)])
    window, steps, share = common_window([a, b])
    assert window == pytest.approx(25.0)  # t = 25 .. 50
    assert steps == pytest.approx([625.0, 625.0])  # 25 steps/s each: 50 aggregate, not a's alone-time 50 + b's 25
    assert 0 < share < 1


def test_runs_that_never_overlap_are_refused(tmp_path):
    a = _run(tmp_path / "a", [(0, 0), (1, 10), (2, 20)])
    b = _run(tmp_path / "b", [(5, 0), (6, 10), (7, 20)])
    with pytest.raises(SystemExit, match="raise --steps"):
        common_window([a, b])
