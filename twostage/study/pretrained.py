"""Pretrained tokenizers in a study: a spec entry `{run: PATH}` names a tokenizer run folder (a converted
published checkpoint, or any finished `tokenizer train` run) that the study encodes and evaluates as it is.

    tokenizers:
      - {preset: vq_fmnist_f4, label: "vq f4 (ours)"}
      - {run: runs/llamagen_vq16, label: "LlamaGen VQ-16"}

The run folder is only read. Its tokenizer job has no train stage; its first stage (`study link-run`)
writes a *view* of it under the study folder, DIR/tokenizers/<id>/run/: the run's config.yaml with the
study's `data:` keys applied (as a trained tokenizer gets them) and a symlink to the run's checkpoints
(for a `twostage export` folder: its config.json with the data keys and symlinks to its weights and records).
Encoding, eval recon and the generators' decoding then read the view, so the study's data settings
apply and nothing is ever written into the given folder.

The tokenizer id hashes the view's config together with the sha256 of the weights file the study reads,
so replacing the weights (or changing `data:`) is a new tokenizer job and re-runs everything after it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from twostage import config as configlib
from twostage import registry
from twostage.common.atomic import write_text_atomic
from twostage.config import ConfigError


def check_run_folder(path: str | Path, where: str) -> str:
    """The tokenizer kind of a run folder, or a one-line ConfigError (missing, not a tokenizer run)."""
    from twostage.engine.run_files import is_pretrained, recorded_kind

    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"{where}: run folder {str(path)!r} does not exist")
    if not ((run / "config.yaml").is_file() or is_pretrained(run)):
        raise ConfigError(f"{where}: {str(path)!r} is not a run folder (it has no config.yaml) nor a "
                          "`twostage export` folder (config.json + model.safetensors + pretrained.json)")
    kind = recorded_kind(run) or registry.default_kind("tokenizer")
    if kind not in registry.TOKENIZERS:
        raise ConfigError(f"{where}: {str(path)!r} is not a tokenizer run (its config.yaml has kind={kind!r}; "
                          f"tokenizer kinds: {', '.join(registry.TOKENIZERS)})")
    return kind


def weights_file(run: str | Path, where: str = "") -> Path:
    """The file `tokenizer encode` / `eval recon` read by default (weights auto: the latest checkpoint's
    EMA weights when saved, else its raw weights): the file whose hash identifies the tokenizer."""
    from twostage.engine.run_files import RunLoadError, checkpoint_file, checkpoint_path

    try:
        return checkpoint_file(checkpoint_path(run))
    except RunLoadError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


def weights_sha256(run: str | Path, where: str = "") -> str:
    from twostage.common.hashing import file_sha256

    return file_sha256(weights_file(run, where))  # remembered per (path, size, mtime): plans are rebuilt often


def link_run(source: str | Path, out: str | Path, overrides: list[str] = ()) -> Path:
    """Write the view of a pretrained tokenizer run into `out` (see the module docstring); returns `out`.

    Re-running replaces the view's two entries and nothing else; `out` must not hold real checkpoints."""
    from twostage.engine.run_files import PRETRAINED, RECORDS, config_path, is_pretrained

    source, out = Path(source), Path(out)
    check_run_folder(source, "study link-run")
    _, cfg = registry.load_config("tokenizer", str(config_path(source)), list(overrides))
    out.mkdir(parents=True, exist_ok=True)
    if is_pretrained(source):  # an export: the view is an export too (config.json + links to the rest)
        for name in ("model.safetensors", PRETRAINED, *RECORDS):
            if (out / name).is_symlink():
                (out / name).unlink()
            if (source / name).is_file():
                os.symlink((source / name).resolve(), out / name)
        write_text_atomic(out / "config.json", json.dumps(configlib.to_dict(cfg), indent=2, default=list))
        return out
    link = out / "checkpoints"
    if link.is_symlink():
        link.unlink()
    elif link.exists():  # a real folder: never delete checkpoints the study did not link
        raise ConfigError(f"{out} holds a checkpoints folder of its own; it is not a view of a pretrained run")
    os.symlink(source.resolve() / "checkpoints", link, target_is_directory=True)
    configlib.save(cfg, out / "config.yaml")
    return out


__all__ = ["check_run_folder", "weights_file", "weights_sha256", "link_run"]
