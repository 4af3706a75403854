"""A toy tokenizer kind, "pool", written the way a new family would be: one config, one Task, one
inference class, one registry entry (twostage/registry.py). Nothing else in the package knows it.

The "pool" tokenizer averages f x f pixel blocks of the grayscale image and quantizes the block mean
into `levels` equal bins (the token), then decodes by painting each block with its bin's learned
value. The bin values are the only parameters, trained with the engine against the pixel MSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twostage import registry
from twostage.config import check
from twostage.data.config import DataConfig
from twostage.data.token_cache import token_dtype
from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig, OptimSpec, Phase, PhaseContext, TaskBase
from twostage.tokenizers.autoencoder_task import batch_images
from twostage.tokenizers.base import CacheLayout, Tokenizer


@dataclass
class PoolModelConfig:
    factor: int = field(default=4, metadata=check(choices=(1, 2, 4, 8)))
    levels: int = field(default=16, metadata=check(ge=2))
    in_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        return self.factor


@dataclass
class PoolRunConfig:
    kind: str = field(default="pool", metadata=check(choices=("pool",)))
    data: DataConfig = field(default_factory=DataConfig)
    model: PoolModelConfig = field(default_factory=PoolModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2))
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    def label(self) -> str:
        return f"pool f{self.model.factor} L{self.model.levels}"

    def study_columns(self) -> dict:
        return {"codebook_size": self.model.levels, "latent_channels": None, "crt": False, "vf": False}


class PoolModel(nn.Module):
    def __init__(self, cfg: PoolModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.values = nn.Parameter(torch.linspace(-1, 1, cfg.levels))
        self.downsample_factor = cfg.factor

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return image_size // self.cfg.factor, image_size // self.cfg.factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(x.mean(1, keepdim=True), self.cfg.factor)[:, 0]
        return ((means + 1) / 2 * self.cfg.levels).long().clamp(0, self.cfg.levels - 1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.values[ids][:, None]
        return F.interpolate(blocks, scale_factor=self.cfg.factor, mode="nearest").expand(-1, 3, -1, -1)


class PoolTask(TaskBase):
    def __init__(self, cfg: PoolRunConfig) -> None:
        self.cfg = cfg
        self.modules = {"tokenizer": PoolModel(cfg.model)}

    def optimizers(self) -> dict[str, OptimSpec]:
        return {"ae": OptimSpec(["tokenizer"], self.cfg.optim)}

    def phases(self) -> list[Phase]:
        return [Phase("autoencoder", ["ae"], self.loss)]

    def loss(self, ctx: PhaseContext):
        x = batch_images(ctx.batch).to(ctx.device).expand(-1, 3, -1, -1)
        model = ctx.models["tokenizer"]
        recon = model.decode(model.encode(x))
        return F.mse_loss(recon, x), {}


class PoolTokenizer(Tokenizer):
    kind = "pool"
    config_class = PoolRunConfig
    model_class = PoolModel

    def cache_layout(self) -> CacheLayout:
        h, w = self.grid_size()
        levels = self.config.model.levels
        return CacheLayout("tokens", (h * w,), token_dtype(levels), {"codebook_size": levels})

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        return self.model.encode(self.prepare(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        ids = codes.to(self.device, torch.int64)
        if ids.ndim == 2:
            side = int(round(ids.shape[1] ** 0.5))
            ids = ids.view(-1, side, side)
        return self.model.decode(ids).clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        return self.decode(self.encode(images))


POOL = registry.TokenizerKind(name="pool", config="toy_kind:PoolRunConfig", task="toy_kind:PoolTask",
                              tokenizer="toy_kind:PoolTokenizer", cache="tokens",
                              summary="toy: quantized block means (tests only)")


def register() -> registry.TokenizerKind:
    return registry.register_tokenizer(POOL)


def unregister() -> None:
    registry.TOKENIZERS.pop("pool", None)


__all__ = ["PoolRunConfig", "PoolTask", "PoolTokenizer", "register", "unregister", "np"]
