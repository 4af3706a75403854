"""One report over several runs of one study spec that differ only in their seeds.

    twostage study report results/study_crt results/study_crt_seeds345 --out results/study_crt_pooled/report

A claim is checked first run against run (`twostage study replication`: every winner of the original
must win again with unseen seeds). Where both runs leave a comparison unresolved, their seeds together
are the better estimate: the rows of both tables go into one analysis, so each cell's interval and each
paired difference rests on all the seeds (twice the tokenizer seeds, about 1/sqrt(2) the interval
width). Pooling is refused when the specs differ beyond seeds (another recipe is another experiment:
compare those with `study replication`) or when the folders share a run (the same seed twice would be
counted twice). Paths in the rows (tokenizer runs, samples, grids) get their folder in front, as the
folder was given, so that curves and sample grids are read from the folder each run lives in (relative
to the working directory) and the report holds no path of the machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from twostage.common.errors import UserError
from twostage.study.replication import folder_spec, spec_differences

__all__ = ["PATH_COLUMNS", "pool_rows"]

PATH_COLUMNS = ("tokenizer_run", "generator_run", "samples_npz", "grid_png")  # relative to the study folder


def pool_rows(directories: Sequence[Path], rows_of: Sequence[list[dict[str, Any]]]) -> tuple[list[dict], str]:
    """The rows of every folder as one table, and a digest of the folders' tables in order.
    Raises UserError naming the folders when their specs differ beyond seeds or they share a run."""
    first = folder_spec(Path(directories[0]))
    for d in directories[1:]:
        spec = folder_spec(Path(d))
        if first is None or spec is None:
            missing = directories[0] if first is None else d
            raise UserError(f"{Path(missing) / 'study.yaml'} is missing; pooling needs each folder's "
                            "spec to check that the runs differ only in their seeds")
        changed = spec_differences(first, spec)
        if changed:
            raise UserError(f"{directories[0]} and {d} are not runs of one spec ({'; '.join(changed[:3])}"
                            f"{'; ...' if len(changed) > 3 else ''}): pool only runs that differ in their seeds; "
                            "compare the others with `twostage study replication`")
    pooled, owner = [], {}
    for d, rows in zip(directories, rows_of):
        for r in rows:
            if r["run_id"] in owner:
                raise UserError(f"run {r['run_id']} (tokenizer seed {r.get('tokenizer_seed')}, generator "
                                f"seed {r.get('generator_seed')}) is in both {owner[r['run_id']]} and {d}: pooled "
                                "folders must not share seeds, or that run would count twice")
            owner[r["run_id"]] = d
            pooled.append({**r, **{k: str(Path(d) / r[k]) for k in PATH_COLUMNS if r.get(k)}})
    digest = hashlib.sha256(b"".join((Path(d) / "results.parquet").read_bytes() for d in directories)).hexdigest()
    return pooled, digest
