"""Atomic checkpoints: safetensors for every tensor, one small JSON file for everything else.

Layout of a run's `checkpoints/` folder:

    step_0001000/model.safetensors   "<module>.<param>" -> tensor
    step_0001000/ema.safetensors     same keys, EMA weights (only with EMA)
    step_0001000/optim.safetensors   tensors of optimizer / scheduler / RNG states, keyed by path
    step_0001000/state.json          the rest of those states, with {"__tensor__": key} placeholders
    step_0001000/dcp/                train.parallel=fsdp only: model, EMA and optimizer shards
                                     (torch.distributed.checkpoint, one file per rank; engine/fsdp.py)
    latest                           text: the name of the newest complete folder

A checkpoint is written into a hidden temporary folder, each file flushed to disk, and the folder is
then renamed into place (atomic on POSIX); `latest` is replaced the same way. A crash at any moment
therefore leaves the previous checkpoint complete and `latest` pointing at a complete folder. A write
that fails (a full disk) removes its temporary folder or file at once; one that is killed leaves it
for the next save to clear. safetensors' I/O errors are raised as the OSError they are (errno and the
file's path), so a full disk is recognised (`is_disk_full`) whichever writer hit it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from twostage.common import atomic
from twostage.common.errors import UserError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust side reports an I/O error


class CheckpointError(RuntimeError):
    pass


class DiskFullError(UserError, RuntimeError):
    """A write failed because the disk (or the user's quota) is full; the message says what was kept."""

    def __init__(self, message: str, errno_: int = errno.ENOSPC):
        super().__init__(message)
        self.errno = errno_


def os_error_code(err: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one ("... (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    if isinstance(err, SafetensorError):
        found = _OS_ERROR.search(str(err))
        return int(found.group(1)) if found else None
    return None


def is_disk_full(err: BaseException) -> bool:
    return os_error_code(err) in DISK_FULL


# ---------------------------------------------------------------------------------------------------
# nested state <-> (JSON skeleton, flat tensor dict)


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """Replace every tensor in a nested structure by a placeholder and collect it in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_tensors(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint state ({path})")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_tensors."""
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            # JSON keeps int keys as ints inside [key, value] pairs, so optimizer state ids survive.
            return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
    return obj


def module_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Flat "<module>.<key>" -> tensor dict; tensors that share storage (tied weights) are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            t = value.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[f"{name}.{key}"] = t
    return out


def load_module_tensors(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sub:
            raise CheckpointError(f"the checkpoint has no weights for module '{name}'")
        module.load_state_dict(sub, strict=True)


# ---------------------------------------------------------------------------------------------------
# writing and reading


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash leaves either the old or the new file, never half of one;
    a write that fails (a full disk) leaves the old file and no temporary one. Synced to disk: run
    records and the `latest` pointer must survive a power cut that the weights they name survive."""
    atomic.write_text_atomic(path, text, fsync=True)


_write_text_atomic = write_text_atomic


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O errors raised as OSError (errno, strerror, path)."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        code = os_error_code(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def begin_checkpoint(folder: Path, step: int, tag: str | None = None) -> Path:
    """Clear temporary folders left by killed writers and make the temporary folder of checkpoint `step`
    (`tag`: a name every rank can compute, for writers in several processes; default: this pid)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-step_{step:07d}-{tag or os.getpid()}"
    tmp.mkdir()
    return tmp


def save_checkpoint(
    folder: Path,
    step: int,
    model: dict[str, torch.Tensor],
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
    protect: Iterable[int] = (),
    tmp: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `folder`; keep the newest `keep` checkpoints and those
    of the steps in `protect`. `tmp`: a temporary folder from `begin_checkpoint` that already holds
    other parts of the checkpoint (the sharded states of an FSDP run), renamed into place with it.

    A failed write (OSError, e.g. ENOSPC) removes the temporary folder before the error goes on, so the
    space is given back and the folder holds complete checkpoints only."""
    name = f"step_{step:07d}"
    if tmp is None:
        tmp = begin_checkpoint(folder, step)
    final = folder / name
    try:
        state_tensors: dict[str, torch.Tensor] = {}
        skeleton = split_tensors(state, state_tensors)
        _save_tensors(model, tmp / "model.safetensors")
        if ema is not None:
            _save_tensors(ema, tmp / "ema.safetensors")
        _save_tensors(state_tensors, tmp / "optim.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "state": skeleton}))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        if final.exists():  # re-saving a step (e.g. after resuming at it): swap in the new one
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(folder / LATEST, name + "\n")
    kept = {f"step_{s:07d}" for s in protect}
    for old in list_checkpoints(folder)[:-keep]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if (target / "state.json").is_file():
            return target
        log.warning("%s points at a missing checkpoint %s; using the newest complete one", pointer, target)
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_state(path: Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of one checkpoint folder, without reading its weights (an FSDP run loads those
    from its shards)."""
    try:
        meta = json.loads((path / "state.json").read_text())
        return int(meta["step"]), join_tensors(meta["state"], load_file(str(path / "optim.safetensors")))
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err}). Delete that folder to resume from the one before it."
        ) from err


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(step, model tensors, state, ema tensors or None) of one checkpoint folder."""
    try:
        meta = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        state = join_tensors(meta["state"], load_file(str(path / "optim.safetensors")))
        ema_file = path / "ema.safetensors"
        ema = load_file(str(ema_file)) if ema_file.is_file() else None
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err}). Delete that folder to resume from the one before it."
        ) from err
    return int(meta["step"]), model, state, ema


# ---------------------------------------------------------------------------------------------------
# finiteness (which checkpoint is really "good" after a run went NaN)


def has_finite_weights(path: Path, model_keys: set[str] | None = None, ema_keys: set[str] | None = None) -> bool:
    """Whether every floating tensor of a checkpoint's model.safetensors and ema.safetensors is finite.

    `model_keys` / `ema_keys` limit the check to those keys (e.g. the parameters, so that a buffer that
    holds -inf on purpose, like an attention mask, does not count). Tensors are read one at a time; an
    unreadable file counts as not finite (the checkpoint cannot be resumed from either)."""
    for name, keys in (("model.safetensors", model_keys), ("ema.safetensors", ema_keys)):
        file = path / name
        if not file.is_file():
            if name == "model.safetensors":
                return False
            continue
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    if keys is not None and key not in keys:
                        continue
                    t = fh.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return False
        except (OSError, ValueError, SafetensorError):
            return False
    return True


def last_finite_checkpoint(
    folder: Path, model_keys: set[str] | None = None, ema_keys: set[str] | None = None
) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint whose weights are all finite or None, the newer ones that are not)."""
    bad: list[Path] = []
    for path in reversed(list_checkpoints(folder)):
        if has_finite_weights(path, model_keys, ema_keys):
            return path, bad[::-1]
        bad.append(path)
    return None, bad[::-1]
