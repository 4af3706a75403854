"""Which config changes a resumed run accepts, and how the accepted ones take effect.

Config changes between a run and its resumption (the saved `config.yaml` against the new config):

* `RESUMABLE_CHANGES` (train.steps, train.log_every, ...) are always accepted.
* `resume_changes=True` (the CLIs' `--resume-with-changes`) also accepts optimizer / schedule changes:
  every key under a section named `optim` at any depth (optim.lr, optim.ae.betas, ...; lr, betas, eps,
  weight_decay, warmup_steps, schedule, min_lr_ratio, grad_clip, kind, fused) and `OPT_IN_CHANGES`
  (train.precision, train.device, train.stop_on_nonfinite, and train.ema_decay from one number to
  another). The optimizers keep their state (moments, step counts) but take every hyperparameter from
  the new config, and each schedule is the new config's schedule evaluated at the resumed step.
* Everything else (model, data, loss, train.seed, train.batch_size, train.grad_accum, switching EMA on
  or off, ...) is refused: it would not be the same run any more.

Accepted changes are saved to `config.yaml` and appended to `run.json` as
`"changes": [{"step": N, "changes": {"optim.lr": [old, new], ...}}, ...]` (N: the resumed step).

The optimizers keep their per-parameter state across an accepted change but take their hyperparameters
from the new config (`with_hyperparameters`), and each schedule keeps its position with the new
config's base rates and shape (`load_schedule`). twostage/engine/trainer.py calls `check_changes` before
anything is written into the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from twostage import config as configlib
from twostage.engine import checkpoint as ckpt

# Keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                     "train.progress", "train.num_workers", "train.compile", "train.data_on_device",
                     "train.ckpt_at", "train.deterministic", "train.profile_steps",
                     "train.cudnn_benchmark", "train.compile_mode"}
# Keys (besides everything under an `optim` section) accepted only with resume_changes=True: they change
# how the run continues, but not the model, the data order or the seed.
OPT_IN_CHANGES = {"train.precision", "train.device", "train.stop_on_nonfinite", "train.ema_decay"}
RESUME_FLAG = "--resume-with-changes"


def change_kind(key: str, old: Any, new: Any) -> str:
    """How a resumed run treats a change of the flattened config key `key`: "free" (always accepted),
    "opt_in" (accepted with resume_changes=True) or "refused"."""
    if key in RESUMABLE_CHANGES:
        return "free"
    if "optim" in key.split(".")[:-1]:
        return "opt_in"
    if key in OPT_IN_CHANGES:
        if key == "train.ema_decay" and (old is None or new is None):
            return "refused"  # turning EMA on or off changes what the checkpoints hold
        return "opt_in"
    return "refused"


def check_changes(run_dir: Path, full_config: dict, accept_optim: bool) -> dict[str, list[Any]]:
    """{changed key: [old, new]} between the run folder's saved config.yaml and `full_config` (empty for a
    new run), when every change can be resumed: RESUMABLE_CHANGES always, optimizer / schedule changes
    and OPT_IN_CHANGES with `accept_optim` (the CLIs' --resume-with-changes); a ConfigError naming them
    otherwise."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return {}

    old = configlib.flatten(yaml.safe_load(saved.read_text()) or {})
    new = configlib.flatten(full_config)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    kinds = {k: change_kind(k, old.get(k), new.get(k)) for k in changed}
    refused = [k for k in changed if kinds[k] == "refused"]
    opt_in = [k for k in changed if kinds[k] == "opt_in"]

    def shown(config: dict, key: str) -> str:  # a key a config omits is a field at its default (`added`)
        return repr(config[key]) if key in config else "(default)"

    def details(keys: list[str]) -> str:
        text = ", ".join(f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in keys[:8])
        return text + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    if refused:
        others = [k for k in changed if k not in refused]
        also = f"; also changed: {details(others)}" if others else ""
        raise configlib.ConfigError(
            f"{run_dir} holds a run with a different config ({details(refused)}{also}). "
            f"{'This setting changes' if len(refused) == 1 else 'These settings change'} the model, the data, "
            f"the seed or what a checkpoint holds, so the run cannot continue with "
            f"{'it' if len(refused) == 1 else 'them'}: resume with the same config, or train into a new --out "
            "folder."
        )
    if opt_in and not accept_optim:
        raise configlib.ConfigError(
            f"{run_dir} holds a run with a different config ({details(changed)}). Only optimizer / "
            f"schedule settings changed: re-run with {RESUME_FLAG} (resume_changes=True in Python) to continue "
            "this run from its latest checkpoint with them (recorded in run.json), or resume with the same "
            "config, or train into a new --out folder."
        )
    return {k: [old.get(k), new.get(k)] for k in changed}


def with_hyperparameters(saved: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state whose param groups take every hyperparameter (lr, betas, eps, weight decay,
    flags) from `opt`, the optimizer built from the config being run; the per-parameter state (moments,
    step counts) is the saved one. For an unchanged config the two agree."""
    fresh = opt.state_dict()["param_groups"]
    if len(saved["param_groups"]) != len(fresh):
        raise ckpt.CheckpointError(
            f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, the new one "
            f"{len(fresh)}: the trained modules changed, so this run cannot be resumed"
        )
    groups = [{**old, **{k: v for k, v in new.items() if k not in ("params", "param_names")}}
              for old, new in zip(saved["param_groups"], fresh)]
    return {**saved, "param_groups": groups}


def load_schedule(sched: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    """Restore a schedule's position (last_epoch) but keep the base learning rates and the lambdas of the
    config being run, and set each group's lr to that schedule at the restored position."""
    base_lrs = list(sched.base_lrs)
    sched.load_state_dict(saved)
    sched.base_lrs = base_lrs
    lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, base_lrs)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = list(lrs)


def read_changes(path: Path) -> list[dict[str, Any]]:
    """The list of config changes a run.json already records (empty when there is none)."""
    try:
        changes = json.loads(path.read_text()).get("changes", [])
    except (OSError, ValueError, AttributeError):
        return []
    return changes if isinstance(changes, list) else []
