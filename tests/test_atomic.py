"""Atomic files written by several writers at once (twostage/common/atomic.py), as the jobs of a study
write the same cached reference statistics."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from twostage.common.atomic import atomic_write, write_text_atomic
from twostage.metrics.frechet import FeatureStats


def test_concurrent_writers_of_one_file_all_succeed(tmp_path):
    """Eight writers saving the same statistics 20 times each: with one shared temporary name a writer
    renamed another's half-written file away and the other's rename failed (FileNotFoundError)."""
    path = tmp_path / "stats.npz"
    stats = FeatureStats(mu=np.arange(64.0), sigma=np.eye(64), n=10, protocol={"network": "x"})
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer() -> None:
        start.wait()
        try:
            for _ in range(20):
                stats.save(path)
        except BaseException as err:  # noqa: BLE001  (collected and asserted below)
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_write(path) as fh:
        fh.write("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
