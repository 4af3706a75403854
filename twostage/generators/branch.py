"""The shorter budgets of a run, taken from its checkpoints: `twostage generator branch RUN --step N`.

When a run's learning-rate schedule does not depend on its length (warmup, then constant: the presets'
recipe), training it for N steps is exactly the first N steps of training it longer: the same
initialization, data order, dropout draws and updates (the engine keeps checkpoint-time work off the
training random stream). So a study's budgets b1 < b2 < ... < B of one grid point need one run of B
steps with checkpoints at every b (`train.ckpt_at`), and each b-run is a copy of that run cut at step b.

`branch_run` checks that premise for every optimizer of the config (the schedule evaluated for N and
for the source's length agrees at every step before N) and refuses otherwise (a cosine schedule
decays over the run's length, so its prefix is not the shorter run). The branched folder is a run folder
of `train.steps = N`: config.yaml, model.json, run.json (+ "branched_from"), the checkpoint at N (model,
EMA, optimizer state: training it further resumes from there), the validation records, sample grids and
metrics.jsonl rows up to N. It is written under a temporary name and renamed, so it exists whole or not
at all; branching again into the same folder replaces the earlier branch (a study's done/ markers stay).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from twostage import config as configlib
from twostage import registry
from twostage.common.errors import UserError
from twostage.engine import checkpoint as ckpt
from twostage.engine.optim import lr_factor
from twostage.engine.run_files import checkpoint_path
from twostage.engine.task import OptimConfig


def optim_configs(cfg: Any) -> Iterator[tuple[str, OptimConfig]]:
    """(dotted key, OptimConfig) of every optimizer section of a run config, at any depth."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, OptimConfig):
            yield f.name, value
        elif dataclasses.is_dataclass(value):
            yield from ((f"{f.name}.{k}", v) for k, v in optim_configs(value))


def prefix_mismatch(cfg: Any, steps: int) -> str | None:
    """Why the first `steps` steps of a run of `cfg` are not the run of `steps` steps (its schedule
    depends on the run's length), or None when they are."""
    total = int(cfg.train.steps)
    for key, optim in optim_configs(cfg):
        for s in range(steps):
            if lr_factor(s, optim, steps) != lr_factor(s, optim, total):
                return (f"{key}.schedule={optim.schedule!r} depends on the run's length (at step {s} the learning rate "
                        f"factor is {lr_factor(s, optim, steps):.4g} for {steps} steps, {lr_factor(s, optim, total):.4g} "
                        f"for {total})")
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # checkpoints are never modified in place: a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)


def branch_run(run: str | Path, steps: int, out: str | Path) -> Path:
    """Write the run folder `out` of `run`'s config trained for `steps` steps, from `run`'s checkpoint at
    that step (see the module docstring); returns `out`. Refuses an `out` that holds anything."""
    run, out = Path(run), Path(out)
    kind = registry.run_kind("generator", run)
    cfg = configlib.load(kind.config_class(), run / "config.yaml")
    total = int(cfg.train.steps)
    if not 0 < steps <= total:
        raise UserError(f"--step {steps}: {run} trains for {total} steps; branch at a step in 1..{total}")
    why = prefix_mismatch(cfg, steps)
    if why is not None:
        raise UserError(f"{run} cannot be cut at step {steps}: {why}. Train the {steps}-step run on its own "
                        "(`generator train ... train.steps=N`), or use a constant schedule after warmup.")
    source = checkpoint_path(run, steps)  # a clear error when there is no checkpoint at that step
    _check_out(out)
    branched = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=steps, ckpt_at=[s for s in cfg.train.ckpt_at if s < steps]))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints" / source.name).mkdir(parents=True)
    try:
        _write_folder(run, steps, tmp, source, branched)
        if out.exists():  # empty, a study's done/ markers only, or an earlier branch (_check_out)
            if (out / "done").is_dir():
                os.replace(out / "done", tmp / "done")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path) -> None:
    """`out` may be missing, empty, hold only a study's done/ markers, or hold an earlier branch (which is
    replaced); anything else (a trained run, other files) is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file; branch into a new folder")
    others = [p.name for p in out.iterdir() if p.name != "done"]
    meta = out / "run.json"
    earlier = meta.is_file() and "branched_from" in json.loads(meta.read_text())
    if others and not earlier:
        raise FileExistsError(f"{out} holds {', '.join(sorted(others)[:4])}, not an earlier branch; branch into a "
                              "new folder")


def _write_folder(run: Path, steps: int, tmp: Path, source: Path, cfg: Any) -> None:
    import yaml

    for f in source.iterdir():
        _link_or_copy(f, tmp / "checkpoints" / source.name / f.name)
    (tmp / "checkpoints" / ckpt.LATEST).write_text(source.name + "\n")
    (tmp / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
    shutil.copy2(run / "model.json", tmp / "model.json")
    meta = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    meta["branched_from"] = {"run": str(run.resolve()), "step": steps}
    (tmp / "run.json").write_text(json.dumps(meta, indent=2))
    for sub in ("val", "samples"):  # records and grids of the steps the shorter run has
        for f in sorted((run / sub).glob("step_*")) if (run / sub).is_dir() else []:
            step = int(f.stem.split("_")[1])
            if step <= steps:
                (tmp / sub).mkdir(exist_ok=True)
                shutil.copy2(f, tmp / sub / f.name)
    log = run / "metrics.jsonl"
    if log.is_file():
        rows = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= steps]
        (tmp / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))


__all__ = ["branch_run", "prefix_mismatch", "optim_configs"]
