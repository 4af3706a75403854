"""A run's metrics: one JSON line per log step (metrics.jsonl) and TensorBoard events (tb/)."""

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
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file shows one history."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
