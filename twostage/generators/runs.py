"""A generator run folder, the same for every kind: what training records in it and how it is loaded back.

    RUN/config.yaml              the resolved run config (`kind` names the generator kind)
    RUN/model.json               `model_record`: the same keys for every kind (below) + the kind's own
    RUN/val/step_XXXXXXX.json    validation at each checkpoint: {"step", "loss", ...} (+ "per_position" for AR)
    RUN/samples/step_XXXXXXX.png a grid of samples at each checkpoint (when the tokenizer is loadable)
    RUN/checkpoints/             the engine's checkpoints (twostage/engine/checkpoint.py)

model.json keys every kind writes, so that the study table reads any run without knowing its kind:

    kind, parameters (total), non_embedding_parameters, train_flops_per_token, forward_flops_per_token,
    tokens_per_image, train_flops_per_step, grid, num_classes, image_size, tokenizer_run,
    tokenizer_checksum, train_cache, val_cache, train_samples
    train_label_counts  images per class in the training cache (runs trained by this version; not in
                        converted runs): `generator sample --labels train` draws in these proportions
                        without the cache (twostage/generators/outputs.py: sample_labels)

A "token" is a position of the tokenizer's grid (h*w per image), whatever the generator does with it
(the DiT's patches group p x p of them), so C = train_flops_per_token * steps * batch * tokens_per_image
(twostage/study/flops.py) holds for every kind. Each model computes its own FLOPs (`flops_per_token`).

Resuming (re-running `generator train` into a folder with a checkpoint) is refused, before anything is
written, when the cache is not what the run trained on (`check_resume`: another tokenizer, other
data). model.json is written by the task's `on_start`, which the engine calls only once it has accepted
the run (config and checkpoint): a refused attempt, fresh or resumed, leaves every run record as it was.
A full disk while training is one line naming the checkpoint that is kept: the engine raises it
(`DiskFullError`, twostage/engine/checkpoint.py).
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from twostage import config as configlib
from twostage.common.device import resolve_device
from twostage.common.errors import UserError
from twostage.config import ConfigError
from twostage.data.token_cache import CacheMeta
from twostage.engine.run_files import (RunLoadError, load_run_weights, load_state_strict, read_model_json,
                                       recorded_kind, write_model_json)
from twostage.engine.run_files import config_path as run_config_path


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a single process): the one that writes run files."""
    return int(os.environ.get("RANK", "0")) == 0


# -- training -------------------------------------------------------------------------------------------


def check_val_cache(train: CacheMeta, val: CacheMeta, val_path: str | Path, keys: Iterable[str]) -> None:
    """A validation cache must come from the same tokenizer and grid as the training cache."""
    for key in keys:
        if getattr(val, key) != getattr(train, key):
            raise ConfigError(f"the validation cache {val_path} has {key}={getattr(val, key)!r} but the training "
                              f"cache has {getattr(train, key)!r}; encode both with the same tokenizer")


def model_record(kind: str, model: nn.Module, meta: CacheMeta, *, batch_size: int, train_cache: str | Path,
                 val_cache: str | Path | None, train_samples: int,
                 train_labels: np.ndarray | None = None) -> dict[str, Any]:
    """The kind-independent part of model.json, followed by the model's `architecture()`.

    `model` provides param_counts() {"total", "non_embedding", ...}, flops_per_token() {"train",
    "forward"} (per tokenizer-grid position) and architecture() (its kind's own keys). `train_labels`
    (the training cache's labels) are recorded as per-class counts; converters, which have no
    training cache, leave them out.
    """
    counts, flops = model.param_counts(), model.flops_per_token()
    tokens = int(meta.grid[0]) * int(meta.grid[1])
    return {
        "kind": kind, "parameters": int(counts["total"]), "non_embedding_parameters": int(counts["non_embedding"]),
        "train_flops_per_token": float(flops["train"]), "forward_flops_per_token": float(flops["forward"]),
        "tokens_per_image": tokens, "train_flops_per_step": float(flops["train"]) * tokens * batch_size,
        "grid": [int(g) for g in meta.grid], "num_classes": int(meta.num_classes), "image_size": meta.image_size,
        "tokenizer_run": meta.tokenizer_run, "tokenizer_checksum": meta.tokenizer_checksum,
        "train_cache": str(Path(train_cache).resolve()),
        "val_cache": str(Path(val_cache).resolve()) if val_cache is not None else None,
        "train_samples": int(train_samples),
        **({} if train_labels is None else {"train_label_counts": label_counts(train_labels, meta.num_classes)}),
        **model.architecture(),
    }


def label_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Images per class (length num_classes) of a cache's labels."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"the training cache has labels {labels.min()}..{labels.max()} but records "
                          f"num_classes={num_classes}; re-encode it")
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


def write_model(run_dir: str | Path, info: dict[str, Any], arch_keys: Iterable[str]) -> None:
    """RUN/model.json from the main process (refuses a second architecture in one folder). Called from
    the tasks' `on_start`, i.e. once the engine has accepted the run."""
    if is_main_process():
        write_model_json(run_dir, info, ("kind", *arch_keys))


def check_resume(run_dir: str | Path, info: dict[str, Any], arch_keys: Iterable[str], cache: str | Path) -> None:
    """Refuse to continue the run in `run_dir` on data that is not what it trained on; writes nothing.

    Against the model.json a run folder already holds: the same architecture, the same tokenizer
    (tokenizer_checksum: a cache of another tokenizer has the same grid and codebook but its codes mean
    something else) and the same number of training images (another split or --limit changes the data
    order, so the run could not continue exactly). A moved cache of the same tokenizer is accepted, and
    so is anything in a folder without a checkpoint (nothing was trained there yet).
    """
    from twostage.engine import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not (run_dir / "model.json").is_file() or ckpt.latest_checkpoint(run_dir / "checkpoints") is None:
        return
    old = read_model_json(run_dir)
    changed = [k for k in ("kind", *arch_keys) if _plain(old.get(k)) != _plain(info.get(k))]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)} -> {info.get(k)}" for k in changed)
        raise UserError(f"{run_dir} holds a run of another model ({diff}); train into a new --out folder")
    before, now = old.get("tokenizer_checksum") or "", info.get("tokenizer_checksum") or ""
    if before and before != now:
        def named(record: dict[str, Any]) -> str:
            return f" (run {record['tokenizer_run']})" if record.get("tokenizer_run") else ""

        raise ConfigError(
            f"{run_dir} was trained on a cache of the tokenizer with sha256 {before}{named(old)}, but --tokens "
            f"{cache} comes from the tokenizer with sha256 {now or '(none recorded)'}{named(info)}: its codes mean "
            f"something else, so this run cannot continue on them. Resume with a cache of the run's own tokenizer "
            f"(it trained on {old.get('train_cache')}), or train into a new --out folder.")
    if old.get("train_samples") is not None and old.get("train_samples") != info.get("train_samples"):
        raise ConfigError(
            f"{run_dir} was trained on {old['train_samples']} images ({old.get('train_cache')}), but --tokens "
            f"{cache} holds {info.get('train_samples')} images: other data (another split or --limit) cannot "
            "continue this run exactly. Resume with the cache it trained on, or train into a new --out folder.")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def compute_logs(step: int, flops_per_step: float, tokens_per_step: int) -> dict[str, float]:
    """Training compute so far, logged at each checkpoint and recorded with the validation loss."""
    return {"compute/train_flops": step * flops_per_step, "compute/tokens_seen": float(step * tokens_per_step)}


def grid_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step_{step:07d}.png"


# -- loading --------------------------------------------------------------------------------------------


def load_generator_run(run_dir: str | Path, kind: str, config_class: type, module: str,
                       build: Callable[[Any, dict[str, Any]], nn.Module], *, device: str | torch.device = "cpu",
                       weights: str = "auto", step: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A run's model (eval mode, fp32, on `device`) and its model.json record plus "config" (the run
    config), "weights" (ema | raw), "step", "checksum" (sha256 of the weights file) and "weights_file".

    `build(cfg, info)` makes the untrained model from the run config and model.json.
    """
    run_dir = Path(run_dir)
    recorded = recorded_kind(run_dir) or kind
    if recorded != kind:
        raise RunLoadError(f"{run_dir} holds a {recorded!r} run, not a {kind!r} generator; load it with "
                           "twostage.registry.run_kind('generator', run).load_fn()")
    config_path = run_config_path(run_dir)
    cfg = configlib.load(config_class, config_path)
    info = read_model_json(run_dir)
    run = load_run_weights(run_dir, module, weights=weights, step=step)
    model = build(cfg, info)
    load_state_strict(model, run, config_path)
    info = {**info, "config": cfg, "weights": run.weights, "step": run.step, "checksum": run.checksum,
            "weights_file": str(run.file)}
    return model.to(resolve_device(device)).eval(), info


def check_sample_counts(num: int, batch_size: int) -> None:
    """`generator sample --num N --batch-size B`: both must be positive integers."""
    for name, flag, what, value in (("num", "--num", "the number of samples", num),
                                    ("batch_size", "--batch-size", "the sampling batch size", batch_size)):
        try:
            positive = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:
            positive = False
        if not positive:
            raise ConfigError(f"{name}={value!r} ({flag}): {what} must be a positive integer")


def sampling_precision(precision: str, device: torch.device) -> bool:
    """Whether to sample in bf16: asked for and on CUDA (CPU bf16 matmuls are slow and gain nothing)."""
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision={precision!r}: choose bf16 or fp32")
    return precision == "bf16" and device.type == "cuda"


__all__ = ["is_main_process", "check_val_cache", "model_record", "write_model", "check_resume",
           "label_counts", "compute_logs", "grid_path", "load_generator_run",
           "check_sample_counts", "sampling_precision"]
