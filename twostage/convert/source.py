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
import re
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


# twostage fuses an attention's q, k, v 1x1 convs (or linears) into one `qkv`; the peers keep three.
FUSED_QKV = re.compile(r"\.qkv\.(weight|bias)$")


def split_fused_qkv(key: str) -> list[str]:
    """The peer keys a twostage key is made of: "<p>.q.<w>", "<p>.k.<w>", "<p>.v.<w>" for "<p>.qkv.<w>", else it."""
    fused = FUSED_QKV.search(key)
    if fused:
        return [f"{key[:fused.start()]}.{part}.{fused.group(1)}" for part in "qkv"]
    return [key]


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have no common type; the first line says what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{path} cannot be read as a weights-only torch checkpoint: {first}") from None


def listing(keys: Sequence[str], n: int = 4) -> str:
    """The first n keys, and how many more: for one-line error messages."""
    shown = ", ".join(keys[:n])
    return f"{shown} and {len(keys) - n} more" if len(keys) > n else shown


def channel_mult(encoder: Sequence[int], decoder: Sequence[int], base: int, src: Path, kind: str) -> list[int]:
    """The one channel multiplier list of twostage's conv autoencoders (`kind` model) from a peer's level
    widths, encoder and decoder in the same order; a ConversionError when they are not multiples of the
    base width or differ between the two sides."""
    if any(w % base for w in [*encoder, *decoder]):
        raise ConversionError(f"{src}: level widths {list(encoder)} (encoder) / {list(decoder)} (decoder) are not all "
                              f"multiples of the base width {base}")
    if list(encoder) != list(decoder):
        raise ConversionError(f"{src}: the encoder's channel multipliers {[w // base for w in encoder]} differ from "
                              f"the decoder's {[w // base for w in decoder]}; twostage's {kind} model has one "
                              "channel_mult")
    return [w // base for w in encoder]


def gather_state(ours: dict[str, torch.Tensor], sources: dict[str, list[str]], state: dict[str, torch.Tensor],
                 src: Path, what: str, ignored: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Our state dict from the peer's: `sources[key]` names the peer tensors that make our `key` (several
    are concatenated along dim 0, e.g. separate q, k, v into one fused qkv). Every peer tensor is used or
    in `ignored`; a missing, extra or misshapen tensor is one ConversionError naming it (`what`: the
    architecture, e.g. "LlamaGen VQ model")."""
    used = {name for names in sources.values() for name in names}
    missing = sorted(used - set(state))
    unknown = sorted(set(state) - used - set(ignored))
    if missing or unknown:
        parts = ([f"it lacks {listing(missing)}"] if missing else []) + \
                ([f"it has tensors no {what} has: {listing(unknown)}"] if unknown else [])
        raise ConversionError(f"{src} does not match the {what} architecture its shapes describe: " + "; ".join(parts))
    out = {}
    for key, names in sources.items():
        want = (ours[key].shape[0] // len(names), *ours[key].shape[1:])
        for name in names:
            if tuple(state[name].shape) != want:
                raise ConversionError(f"{src}: {name} has shape {tuple(state[name].shape)}; the architecture read "
                                      f"from the other tensors needs {want}")
        out[key] = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
    return out


__all__ = ["read_state_dict", "listing", "gather_state"]
