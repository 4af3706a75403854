"""What a converter produces (`Converted`) and how it becomes a run folder (`write_run`).

The folder has the layout a training run leaves (twostage/engine/run_files.py): config.yaml with the
kind and a model section that rebuilds the architecture, and checkpoints/step_0000000/model.safetensors
written by the engine's checkpoint writer (twostage/engine/checkpoint.py), keyed "<module>.<param>". Its
state holds {"converted_from": ...} (the format, the source file and its sha256, what was dropped) in
place of optimizer states: the weights are there to be used, not to resume a training run from. A
generator's folder also has model.json (twostage/generators/runs.py: its vocabulary, classes, grid and
tokenizer run), which the generator loaders and `generator sample` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from twostage import config as configlib
from twostage.common.errors import UserError
from twostage.convert import ConversionError
from twostage.data.token_cache import CacheMeta
from twostage.engine import checkpoint as ckpt
from twostage.engine.run_files import write_model_json

STEP = 0  # a converted checkpoint is step 0 of its run folder

# cache kind -> (the meta key a generator's input size must match, the kind in words, that size in words)
CACHE_WORDS = {"tokens": ("codebook_size", "discrete codes", "a codebook of {}"),
               "latents": ("channels", "continuous latents", "latents of {} channels")}


@dataclass
class Converted:
    config: Any  # the run config dataclass (a registered kind's)
    modules: dict[str, nn.Module]  # checkpoint module name -> model holding the converted weights
    converted_from: dict[str, Any]  # JSON-able record of the source, stored in the checkpoint's state
    model_json: dict[str, Any] | None = None  # a generator run's model.json record (None: a tokenizer run)


def tokenizer_cache_meta(tokenizer: Path, kind: str, size: int, num_classes: int, src: Path, *, expects: str,
                         fix: str) -> CacheMeta:
    """What a converted generator's model.json records of its tokenizer run (grid, image size, weights'
    sha256), after checking that the run writes the cache `kind` of `size` (codebook or channels) the
    generator in `src` needs; `expects` / `fix` complete the one-line error ("{src} {expects} but ...")."""
    from twostage.tokenizers.base import load_tokenizer

    tok = load_tokenizer(tokenizer)
    layout = tok.cache_layout()
    key, _, sized = CACHE_WORDS[kind]
    found = layout.meta.get(key)
    if layout.kind != kind or found != size:
        what = CACHE_WORDS[layout.kind][1] if layout.kind != kind else sized.format(found)
        raise ConversionError(f"{src} {expects} but the tokenizer run {tokenizer} has {what}; {fix}")
    return CacheMeta(kind=kind, grid=tuple(tok.grid_size()), num_classes=num_classes,
                     tokenizer_run=str(Path(tokenizer).resolve()), tokenizer_checksum=tok.checksum, split="",
                     image_size=tok.image_size, **{key: size})


def check_out(out: Path) -> None:
    """A new or empty folder only: converting over a run would mix two models' checkpoints."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to create")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; convert into a new folder")


def write_run(out: Path, converted: Converted) -> Path:
    """The checkpoint first, config.yaml last: a folder with a config.yaml is complete."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(out / "checkpoints", STEP, ckpt.module_tensors(converted.modules),
                         {"converted_from": converted.converted_from}, keep=1)
    if converted.model_json is not None:
        write_model_json(out, converted.model_json, ())
    ckpt.write_text_atomic(out / "config.yaml", yaml.safe_dump(configlib.to_dict(converted.config), sort_keys=False))
    return out


__all__ = ["STEP", "Converted", "check_out", "write_run"]
