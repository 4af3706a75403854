"""What every trained tokenizer offers for inference, whatever its kind: `Tokenizer` and `load_tokenizer`.

    tok = load_tokenizer("runs/vq_f8", device="cuda")   # the run's kind (config.yaml) picks the class
    codes = tok.encode(images)      # images float [-1, 1] (N, C, H, W) -> codes (ids or latents)
    images = tok.decode(codes)      # -> (N, C, H, W) in [-1, 1]
    recon = tok.reconstruct(images)

A kind (twostage/tokenizers/vq, twostage/tokenizers/kl) subclasses `Tokenizer`, names its config and
model classes, and implements `encode`, `decode`, `reconstruct` and `cache_layout` (what a stage-2
cache of its codes holds). Loading (EMA or raw weights, a step, the weights' sha256) is shared:
twostage/engine/run_files.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from twostage import config as configlib
from twostage.common.device import resolve_device
from twostage.engine.run_files import RunLoadError, load_run_weights, load_state_strict, recorded_kind
from twostage.engine.run_files import config_path as run_config_path

MODULE = "tokenizer"  # the key prefix of every tokenizer's weights in checkpoints

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CacheLayout:
    """How one image's codes are stored in a stage-2 cache (twostage/data/token_cache.py)."""

    kind: str  # "tokens" | "latents"
    item_shape: tuple[int, ...]  # per image and variant: (h*w,) ids or (C, h, w) latents
    dtype: np.dtype
    meta: dict[str, Any]  # kind-specific CacheMeta fields: codebook_size or channels
    channel_stats: bool = False  # keep per-channel mean / std (continuous latents are normalized by them)


class Tokenizer:
    """A trained tokenizer in eval mode with frozen weights."""

    kind: ClassVar[str]
    config_class: ClassVar[type]
    model_class: ClassVar[type[nn.Module]]

    def __init__(self, model: nn.Module, config: Any, *, checksum: str = "", weights_path: Path | None = None,
                 step: int | None = None) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.config = config
        self.checksum = checksum  # sha256 of the weights file: caches and samples record it
        self.weights_path = weights_path
        self.step = step

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, *, device: str | torch.device = "cpu", step: int | None = None,
                        weights: str = "auto") -> Tokenizer:
        """Load a `twostage tokenizer train` run folder; weights: auto (EMA if saved) | ema | raw."""
        run_dir = Path(run_dir)
        config_path = run_config_path(run_dir)
        from twostage.registry import default_kind

        kind = recorded_kind(run_dir) or default_kind("tokenizer")
        if kind != cls.kind:
            raise RunLoadError(f"{run_dir} holds a {kind!r} tokenizer, not a {cls.kind!r} one; "
                               "load it with twostage.tokenizers.load_tokenizer")
        cfg = configlib.load(cls.config_class, config_path)
        run = load_run_weights(run_dir, MODULE, weights=weights, step=step)
        model = cls.model_class(cfg.model)
        load_state_strict(model, run, config_path)
        return cls(model, cfg, checksum=run.checksum, weights_path=run.file, step=run.step).to(device)

    def to(self, device: str | torch.device) -> Tokenizer:
        self.model.to(resolve_device(device))
        return self

    # -- what it is -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """The image size it was trained at."""
        return self.config.image_size

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    def grid_size(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        return self.model.grid_size(self.image_size if image_size is None else image_size)

    def cache_layout(self) -> CacheLayout:
        raise NotImplementedError

    # -- inference ------------------------------------------------------------------------------------

    def autocast(self, precision: str):
        """bf16 autocast or nothing; the kinds keep numerically sensitive parts (lookups) in fp32."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        dtype = PRECISIONS[precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] as float32 on the device; grayscale repeated for an RGB model."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) floats in [-1, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32, non_blocking=True)
        want = self.config.model.in_channels
        if x.shape[1] == 1 and want == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != want:
            raise ValueError(f"images have {x.shape[1]} channels; this tokenizer takes {want}")
        return x

    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        raise NotImplementedError


def load_tokenizer(run_dir: str | Path, *, device: str | torch.device = "cpu", step: int | None = None,
                   weights: str = "auto") -> Tokenizer:
    """The tokenizer of a run folder, whatever its kind (looked up in twostage/registry.py)."""
    from twostage import registry

    kind = registry.run_kind("tokenizer", run_dir)
    return kind.tokenizer_class().from_pretrained(run_dir, device=device, step=step, weights=weights)


__all__ = ["MODULE", "CacheLayout", "Tokenizer", "load_tokenizer"]
