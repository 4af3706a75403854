"""What every generator writes: sample files, preview grids, and the tokenizer it decodes with.

Samples file (read by `twostage eval gen`, twostage/metrics/generation.py):

    FILE.npz   images   uint8 (N, H, W, 3)
               labels   int64 (N,)
               tokens   (N, h, w) code ids (discrete generators; int32)
               protocol JSON string: sampler, steps, cfg scale / interval, seed, precision, labels
    FILE.json  {"protocol": ..., "run": ..., "timing": ...}  (the same record, readable)
    FILE.png   a grid of the first samples
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


class RunLoadError(RuntimeError):
    """A generator run folder that cannot be sampled from (missing files, no checkpoint, mismatch)."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3); one channel is repeated to three."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def save_image_grid(images: torch.Tensor | np.ndarray, path: Path, nrow: int | None = None) -> Path:
    """A PNG grid of float [-1, 1] NCHW tensors or uint8 NHWC arrays."""
    from twostage.common.images import save_grid

    if isinstance(images, np.ndarray):  # uint8 NHWC -> float NCHW, exactly invertible
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return save_grid(images, path, nrow)


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray, protocol: dict[str, Any],
                 tokens: np.ndarray | None = None, extra: dict[str, Any] | None = None, grid: int = 64) -> Path:
    """Write FILE.npz (atomically), FILE.json and FILE.png (first `grid` samples; 0 = none)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"images": images, "labels": labels.astype(np.int64), "protocol": np.array(json.dumps(protocol))}
    if tokens is not None:
        arrays["tokens"] = tokens.astype(np.int32)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"protocol": protocol, **(extra or {})}, indent=2))
    if grid > 0 and len(images):
        save_image_grid(images[:grid], path.with_suffix(".png"))
    return path


def load_tokenizer(run: str | Path, device: torch.device | str = "cpu"):
    """The stage-1 tokenizer that decodes a generator's tokens (imported lazily: the tokenizer
    package is only needed when images are wanted)."""
    from twostage.tokenizers.vq.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(run, device=device)
