"""Configuration of a Representation Autoencoder run (RAE, arXiv:2510.11690): `RAERunConfig`.

    cfg = twostage.config.load(RAERunConfig, "rae_fmnist", ["model.noise_tau=0.5"])

RAE keeps a pretrained representation encoder frozen and trains only a ViT decoder on its features
(docs/methods.md §7, (7.10)-(7.12)). The dataclass defaults are the paper's ImageNet-256 recipe where the
paper fixes them: decoder patch 16 (a 16x16 latent grid at 256 px), ViT-XL decoder (width 1152, 28
blocks, 16 heads, MLP 4096), training noise tau = 0.8, L1 + perceptual + 0.75 x adaptive GAN, AdamW lr
2e-4 betas (0.9, 0.95) without weight decay or clipping, cosine decay to 2e-5. The encoder defaults to
the offline EfficientNet-Lite0 (the paper's DINOv2-B with registers needs a local weights file:
`model.encoder.network=dinov2 model.encoder.weights=PATH`).

The latent grid is the image size divided by `model.patch_size` (the decoder's patch = the downsampling
factor); the encoder is fed grid x its map's stride pixels so that its chosen feature map lands on that
grid (twostage/tokenizers/kl/vf_loss.py, `FoundationFeatures`).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from pathlib import Path

from twostage.config import ConfigError, check
from twostage.data.config import DataConfig
from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig
from twostage.tokenizers.config import LossConfig, MonitorConfig, TokenizerRun

ENCODER_NETWORKS = ("effnet-lite0", "dinov2")

DINOV2_HELP = (
    "RAE's encoder is DINOv2-B/14 with registers; download "
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth on a machine with "
    "internet, copy it here and pass model.encoder.weights=/path/to/dinov2_vitb14_reg4_pretrain.pth, or use "
    "the offline encoder model.encoder.network=effnet-lite0"
)


@functools.lru_cache(maxsize=16)
def _map_channels(network: str, weights: str | None, layer: int | None) -> int:
    """The width of the network's chosen feature map: one probe forward, once per process and setting (the
    encoder module builds the same FoundationFeatures; it is not imported here, since it imports this file)."""
    from twostage.backbones import load_feature_network
    from twostage.tokenizers.kl.vf_loss import FoundationFeatures

    return FoundationFeatures(load_feature_network(network, weights), layer=layer).channels


@dataclass
class RAEEncoderConfig:
    """The frozen representation encoder: which network, which of its feature maps, at which input size."""

    network: str = field(default="effnet-lite0", metadata=check(choices=ENCODER_NETWORKS))
    weights: Path | None = None  # a local checkpoint file; required for dinov2 (effnet-lite0 ships with a package)
    # Index into the network's feature_maps; None = its default (effnet-lite0: 3, the stride-16 map with
    # 112 channels; dinov2: -1, the last block's patch tokens, RAE's choice). For 32 px images the
    # stride-8 map (2, 40 channels) at 64 px keeps an 8x8 grid without blowing the image up 4x.
    layer: int | None = None
    # Pixels fed to the network; None = grid x the map's stride (DINOv2/14 on a 16x16 grid: 224, RAE's input).
    input_size: int | None = field(default=None, metadata=check(gt=0))
    resample: str = field(default="area", metadata=check(choices=("area", "bilinear")))
    # Standardize each position's feature vector over channels, without affine (RAE drops the affine of
    # DINOv2's final LayerNorm): every latent token then has unit RMS, which is the scale tau is set for.
    layer_norm: bool = True
    layer_norm_eps: float = field(default=1e-6, metadata=check(gt=0))

    def check(self) -> None:
        if self.network == "dinov2" and self.weights is None:
            raise ConfigError(f"model.encoder.network=dinov2 needs model.encoder.weights=PATH. {DINOV2_HELP}")


@dataclass
class RAEDecoderConfig:
    """The trained ViT decoder (pre-norm blocks over the latent grid, one linear to p x p pixel patches)."""

    width: int = field(default=1152, metadata=check(gt=0))
    depth: int = field(default=28, metadata=check(gt=0))
    heads: int = field(default=16, metadata=check(gt=0))
    # SwiGLU hidden = 2/3 x mlp_ratio x width (as parameter-matched to a GELU MLP of mlp_ratio x width;
    # RAE's ViT-XL decoder: 4096 / 1152 = 3.56).
    mlp_ratio: float = field(default=3.5556, metadata=check(gt=0))
    qk_norm: bool = False
    norm_eps: float = field(default=1e-6, metadata=check(gt=0))

    def check(self) -> None:
        if self.width % self.heads or self.width % 4:
            raise ConfigError(f"model.decoder.width={self.width} must be divisible by model.decoder.heads={self.heads} "
                              "and by 4 (the 2D sin-cos positions give a quarter of the channels to each of "
                              "sin / cos of rows / columns)")


@dataclass
class RAEModelConfig:
    encoder: RAEEncoderConfig = field(default_factory=RAEEncoderConfig)
    decoder: RAEDecoderConfig = field(default_factory=RAEDecoderConfig)
    patch_size: int = field(default=16, metadata=check(gt=0))  # decoder patch = the downsampling factor
    in_channels: int = field(default=3, metadata=check(choices=(3,)))  # the encoders take RGB (gray is repeated)
    out_channels: int = field(default=3, metadata=check(choices=(1, 3)))
    # Training noise on the latent, z + sigma * eps with sigma ~ U(0, noise_tau) per image
    # (docs/methods.md (7.10)); never at inference.
    noise_tau: float = field(default=0.8, metadata=check(ge=0))

    @property
    def downsample_factor(self) -> int:
        return self.patch_size


@dataclass
class RAENormConfig:
    """Per-channel latent normalization (docs/methods.md (7.12)): statistics of the clean encoder output over
    the first `images` training images, computed once when a run starts and saved in its weights."""

    enabled: bool = True
    images: int = field(default=10000, metadata=check(gt=0))  # LightningDiT also estimates from 10k latents
    eps: float = field(default=1e-5, metadata=check(ge=0))  # std = sqrt(var + eps), as RAE's statistics


@dataclass
class RAELossConfig(LossConfig):
    """The shared loss section with RAE's recipe: L1 + perceptual + 0.75 x adaptive GAN (docs/methods.md (7.11))."""

    pixel: str = field(default="l1", metadata=check(choices=("l1", "l2")))
    gan_weight: float = field(default=0.75, metadata=check(ge=0))
    adaptive_gan_weight: bool = True
    # RAE starts the GAN after 8 of 16 epochs: about step 20000 at batch 512 on ImageNet.
    disc_start: int = field(default=20000, metadata=check(ge=0))
    adaptive_max: float = field(default=1e4, metadata=check(gt=0))


@dataclass
class RAEAdamConfig(OptimConfig):
    """AdamW lr 2e-4, betas (0.9, 0.95), no weight decay, no clipping, warm-up then cosine to 2e-5 (RAE)."""

    kind: str = field(default="adamw", metadata=check(choices=("adam", "adamw")))
    lr: float = field(default=2e-4, metadata=check(gt=0))
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = field(default=2500, metadata=check(ge=0))  # one ImageNet epoch at batch 512
    schedule: str = field(default="cosine", metadata=check(choices=("constant", "cosine")))
    min_lr_ratio: float = field(default=0.1, metadata=check(ge=0, le=1))
    grad_clip: float | None = field(default=None, metadata=check(gt=0))


@dataclass
class RAEOptimConfig:
    ae: RAEAdamConfig = field(default_factory=RAEAdamConfig)
    disc: RAEAdamConfig = field(default_factory=RAEAdamConfig)


@dataclass
class RAERunConfig(TokenizerRun):
    kind: str = field(default="rae", metadata=check(choices=("rae",)))
    data: DataConfig = field(default_factory=DataConfig)
    model: RAEModelConfig = field(default_factory=RAEModelConfig)
    norm: RAENormConfig = field(default_factory=RAENormConfig)
    loss: RAELossConfig = field(default_factory=RAELossConfig)
    optim: RAEOptimConfig = field(default_factory=RAEOptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def label(self) -> str:
        """A short name for tables and figures, e.g. "rae effnet-lite0/L2 f4"."""
        e = self.model.encoder
        layer = "" if e.layer is None else f"/L{e.layer}"
        return f"rae {e.network}{layer} f{self.model.patch_size}"

    def study_columns(self) -> dict:
        """What a study's results table records: the latent width is the encoder map's (probed once)."""
        e = self.model.encoder
        width = _map_channels(e.network, None if e.weights is None else str(e.weights), e.layer)
        return {"codebook_size": None, "latent_channels": width, "crt": False,
                "vf": False}

    def factor_source(self) -> str:
        return f"model.patch_size={self.model.patch_size}"


__all__ = ["RAEEncoderConfig", "RAEDecoderConfig", "RAEModelConfig", "RAENormConfig", "RAELossConfig",
           "RAEAdamConfig", "RAEOptimConfig", "RAERunConfig", "DINOV2_HELP"]
