"""Config sections shared by every tokenizer kind: the autoencoder's losses and what a run monitors.

Each kind's run config (twostage/tokenizers/vq/config.py, twostage/tokenizers/kl/config.py) uses them;
the KL kind subclasses `LossConfig` with its own recipe's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twostage.config import ConfigError, check


@dataclass
class LossConfig:
    """Reconstruction, perceptual and adversarial losses of the autoencoder phase."""

    pixel: str = field(default="l2", metadata=check(choices=("l1", "l2")))
    pixel_weight: float = field(default=1.0, metadata=check(ge=0))
    perceptual: str = field(default="effnet-lite0", metadata=check(choices=("effnet-lite0", "lpips-vgg", "none")))
    perceptual_weight: float = field(default=1.0, metadata=check(ge=0))
    # Resize before the perceptual network: None = the network's own default (EffNet: 224; LPIPS: none).
    perceptual_size: int | None = field(default=None, metadata=check(gt=0))
    # LPIPS-VGG16 weights (local files): trunk = torchvision vgg16 or full LPIPS state dict; heads =
    # the lpips package's vgg.pth (not needed when the trunk file holds them).
    lpips_weights: Path | None = None
    lpips_heads: Path | None = None
    lpips_random_init: bool = False  # untrained LPIPS, for throughput benchmarks only
    gan_weight: float = field(default=0.5, metadata=check(ge=0))  # 0 disables the discriminator
    gan_loss: str = field(default="hinge", metadata=check(choices=("hinge", "non-saturating")))
    disc_start: int = field(default=20000, metadata=check(ge=0))
    disc_layers: int = field(default=3, metadata=check(gt=0))
    disc_channels: int = field(default=64, metadata=check(gt=0))
    disc_norm: str = field(default="batch", metadata=check(choices=("batch", "group", "none")))
    adaptive_gan_weight: bool = False  # LlamaGen's VQ default; the KL-VAE recipe turns it on

    def check(self) -> None:
        if self.perceptual == "lpips-vgg" and self.perceptual_weight > 0:
            if self.lpips_weights is None and not self.lpips_random_init:
                raise ConfigError(
                    "loss.perceptual=lpips-vgg needs loss.lpips_weights=PATH (a local VGG16/LPIPS state dict; "
                    "no VGG weights ship offline) or loss.lpips_random_init=true (benchmarks only); "
                    "the offline default is loss.perceptual=effnet-lite0"
                )


@dataclass
class MonitorConfig:
    """What the run reports besides losses."""

    usage_window: int = field(default=100, metadata=check(gt=0))  # steps over which codebook usage counts
    grid_images: int = field(default=16, metadata=check(ge=0))  # reconstructions in each checkpoint grid
    # Validation at each checkpoint on the first val_images images of the val split: PSNR, SSIM, rFD on the
    # offline feature network, codebook usage (twostage/tokenizers/autoencoder_task.py). 0 = off: on a CPU
    # each image costs two EfficientNet passes at 224 px (about 0.1 s).
    val_images: int = field(default=0, metadata=check(ge=0))


class TokenizerRun:
    """What every tokenizer kind's run config (a dataclass with `data` and `model` sections) derives:
    the image size, and the rule that it divides into the latent grid."""

    data: Any
    model: Any

    @property
    def image_size(self) -> int:
        return self.data.image_size

    def check(self) -> None:
        size, f = self.image_size, self.model.downsample_factor
        if size % f:
            raise ConfigError(f"data.image_size={size} is not divisible by the downsampling factor {f} "
                              f"({self.factor_source()})")

    def factor_source(self) -> str:
        """Which model setting sets the downsampling factor (for the message above)."""
        raise NotImplementedError


__all__ = ["LossConfig", "MonitorConfig", "TokenizerRun"]
