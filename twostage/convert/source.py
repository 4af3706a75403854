"""Reading the state dict out of a published checkpoint file, without running code from it.

Published checkpoints are mostly torch pickles: a plain state dict, or a training checkpoint holding it
under one entry ("model", "ema", "state_dict") next to optimizer states and the run's arguments as an
argparse.Namespace (LlamaGen's tokenizer/tokenizer_image/vq_train.py saves {"model", "optimizer",
"discriminator", "optimizer_disc", "steps", "args"}). They are read with torch.load(weights_only=True),
which builds tensors and plain containers only; argparse.Namespace is allowed as well, since it is
plain data and refusing it would refuse the training checkpoints. safetensors files are read as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch

from twostage.convert import ConversionError


def read_state_dict(path: Path, entries: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, the entry it was read from or "" for a plain state dict) of a .pt / .safetensors file.

    `entries`: the keys a training checkpoint may hold the weights under, in order of preference."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), ""
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, ""
    for entry in entries:
        if isinstance(obj.get(entry), dict):
            return {k: v for k, v in obj[entry].items() if isinstance(v, torch.Tensor)}, entry
    raise ConversionError(f"{path} is neither a state dict nor a checkpoint with one under "
                          f"{' / '.join(map(repr, entries))} (its entries: {', '.join(map(str, list(obj)[:8]))})")


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have no common type; the first line says what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{path} cannot be read as a weights-only torch checkpoint: {first}") from None


__all__ = ["read_state_dict"]
