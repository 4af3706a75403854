"""A run's metrics: one JSON line per log step (metrics.jsonl) and TensorBoard events (tb/).

The engine opens a RunLog only once a run has passed every check (a refused resume creates no events
file). A line whose write fails (a full disk) is taken back whole, so the file never ends in half a line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            except ImportError:  # e.g. a bare GPU image: metrics.jsonl still has everything
                log.warning("tensorboard is not installed: writing metrics.jsonl only (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = (json.dumps({"step": step, "time": time.time(), **values}) + "\n").encode()
        with open(self.path, "ab", buffering=0) as fh:
            start = fh.tell()
            try:
                done = 0
                while done < len(line):
                    done += fh.write(line[done:])
            except BaseException:
                fh.truncate(start)  # no half line for the resume to trip over
                raise
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file shows one history."""
        if not self.enabled or not self.path.is_file():
            return
        from twostage.engine.checkpoint import write_text_atomic

        kept = [line for line in self.path.read_text().splitlines() if _step(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step(line: str) -> float:
    """The step of a metrics line; a torn line (a process killed while writing it) counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
