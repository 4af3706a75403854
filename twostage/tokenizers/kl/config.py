"""Configuration of a KL-VAE tokenizer run (with the VA-VAE VF loss): `KLRunConfig`.

    cfg = twostage.config.load(KLRunConfig, "kl_fmnist_f4d8", ["model.spec=f4d16", "vf.enabled=false"])

Defaults are the LDM KL-VAE / VA-VAE recipe (LDM arXiv:2112.10752, VA-VAE arXiv:2501.01423; docs/methods.md §6, (6.2)-(6.3)): ch 128, multipliers (1,1,2,2,4) for
f16, 2 ResBlocks, attention at the lowest resolution; L1 + LPIPS with a learned log-variance, KL weight
1e-6, PatchGAN hinge with adaptive weight x 0.5; VF loss with margins 0.5 / 0.25 and adaptive weight
x 0.1 at the encoder's last layer; Adam betas (0.5, 0.9), lr 1e-4 **not scaled with batch**.

`model.spec` "fXdY" sets the downsampling factor X and the latent channels Y. The levels follow from X
unless `model.channel_mult` is given (then it must have log2(X) + 1 entries).

The model section also holds what a published KL autoencoder needs to be computed exactly as its own code
does (LDM / Stable Diffusion, VA-VAE, diffusers' AutoencoderKL; twostage/convert/ldm_kl.py sets them):
which levels have attention, the trunk's z channels, whether the 1x1 quant convs exist, the latent scaling
of its diffusion models and whether encoding samples the posterior. Their defaults are the network twostage
trains, and they are `added` fields, so a trained run's config.yaml and config hash do not change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from twostage.config import ConfigError, check
from twostage.data.config import DataConfig
from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig
from twostage.tokenizers.config import LossConfig, MonitorConfig, TokenizerRun

SPEC = re.compile(r"f(\d+)d(\d+)")

# Channel multipliers per downsampling factor (LDM's f16 levels, fewer levels for smaller f).
DEFAULT_MULT = {1: (1,), 2: (1, 2), 4: (1, 2, 4), 8: (1, 2, 2, 4), 16: (1, 1, 2, 2, 4), 32: (1, 1, 2, 2, 4, 4)}


def parse_spec(spec: str) -> tuple[int, int]:
    """"f16d32" -> (16, 32)."""
    m = SPEC.fullmatch(spec)
    if not m:
        raise ConfigError(f"model.spec={spec!r} must look like fXdY, e.g. f16d32 (downsampling 16, 32 channels)")
    f, d = int(m.group(1)), int(m.group(2))
    if f < 1 or f & (f - 1) or d < 1:
        raise ConfigError(f"model.spec={spec!r}: the factor must be a power of two and the channels positive")
    return f, d


@dataclass
class KLModelConfig:
    """The KL autoencoder. Field names match VQConfig where they mean the same (the conv trunk is shared)."""

    spec: str = "f16d32"
    in_channels: int = field(default=3, metadata=check(choices=(1, 3)))
    out_channels: int = field(default=3, metadata=check(choices=(1, 3)))
    base_channels: int = field(default=128, metadata=check(gt=0))
    channel_mult: tuple[int, ...] | None = field(default=None, metadata=check(gt=0))
    enc_res_blocks: int = field(default=2, metadata=check(gt=0))
    dec_res_blocks: int = field(default=3, metadata=check(gt=0))  # LDM's KL decoder: num_res_blocks + 1 = 3
    norm_groups: int = field(default=32, metadata=check(gt=0))
    attn_heads: int = field(default=1, metadata=check(gt=0))
    mid_attn: bool = True
    dropout: float = field(default=0.0, metadata=check(ge=0, lt=1))
    # Levels (0 = full resolution, as in channel_mult) with attention after each ResBlock, in the encoder and
    # the decoder alike. None: the lowest resolution only (LDM's f16 with attn_resolutions [16] at 256 px,
    # VA-VAE); SD's f8 VAE has none ([]); LDM's kl-f32 two ([4, 5]).
    attn_levels: tuple[int, ...] | None = field(default=None, metadata=check(ge=0, added=True))
    # Channels between the trunk and the 1x1 quant convs (LDM's ddconfig z_channels, which may differ from
    # its embed_dim, the latent channels of the spec). None: the latent channels.
    z_channels: int | None = field(default=None, metadata=check(gt=0, added=True))
    # The 1x1 convs around the latent (LDM's quant_conv / post_quant_conv); diffusers' use_quant_conv /
    # use_post_quant_conv can leave them out (e.g. FLUX's autoencoder).
    quant_conv: bool = field(default=True, metadata=check(added=True))
    post_quant_conv: bool = field(default=True, metadata=check(added=True))
    # The latent space the tokenizer's encode() returns and decode() takes: (z - shift_factor) *
    # scaling_factor, as a peer's diffusion model sees its autoencoder's z (SD: scale 0.18215; diffusers'
    # scaling_factor / shift_factor). Training, reconstruct() and the model itself work on z. twostage's DiT
    # normalizes cached latents per channel anyway (docs/methods.md (7.1)), so this matters for latents
    # handed to or taken from a peer's generator.
    scaling_factor: float = field(default=1.0, metadata=check(gt=0, added=True))
    shift_factor: float = field(default=0.0, metadata=check(added=True))
    # What encode() (caches, eval recon) takes of the posterior: its mean (deterministic caches) or a
    # sample, as LDM's get_first_stage_encoding and LightningDiT's extract_features.py do.
    encode_posterior: str = field(default="mean", metadata=check(choices=("mean", "sample"), added=True))

    @property
    def downsample_factor(self) -> int:
        return parse_spec(self.spec)[0]

    @property
    def latent_channels(self) -> int:
        return parse_spec(self.spec)[1]

    @property
    def trunk_channels(self) -> int:
        """Channels of the trunk's latent side: the encoder's output is twice this (mean and log-variance)."""
        return self.latent_channels if self.z_channels is None else self.z_channels

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """The levels with attention after each ResBlock (indices into `levels`)."""
        return (len(self.levels) - 1,) if self.attn_levels is None else tuple(self.attn_levels)

    @property
    def levels(self) -> tuple[int, ...]:
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        f = self.downsample_factor
        if f not in DEFAULT_MULT:
            raise ConfigError(f"model.spec={self.spec!r}: give model.channel_mult for a factor of {f}")
        return DEFAULT_MULT[f]

    def check(self) -> None:
        f, _ = parse_spec(self.spec)
        want = int(math.log2(f)) + 1
        if len(self.levels) != want:
            raise ConfigError(f"model.channel_mult={list(self.levels)} has {len(self.levels)} levels but "
                              f"model.spec={self.spec} (factor {f}) needs {want}")
        if self.attn_levels is not None:
            bad = [i for i in self.attn_levels if i >= want]
            if bad or len(set(self.attn_levels)) != len(self.attn_levels):
                raise ConfigError(f"model.attn_levels={list(self.attn_levels)} must list distinct levels "
                                  f"0..{want - 1} (the {want} levels of model.spec={self.spec})")
        d = self.latent_channels
        for name in ("quant_conv", "post_quant_conv"):
            if not getattr(self, name) and self.trunk_channels != d:
                raise ConfigError(f"model.{name}=false needs model.z_channels equal to the latent channels {d} "
                                  f"(got {self.z_channels}): without the 1x1 conv nothing maps between them")


@dataclass
class KLLossConfig(LossConfig):
    """The VQ loss section with the KL-VAE recipe's defaults, plus the KL terms."""

    pixel: str = field(default="l1", metadata=check(choices=("l1", "l2")))
    adaptive_gan_weight: bool = True
    disc_start: int = field(default=50001, metadata=check(ge=0))
    kl_weight: float = field(default=1e-6, metadata=check(ge=0))
    logvar_init: float = 0.0  # learned scalar log-variance of the reconstruction likelihood
    # Clamp of the adaptive GAN weight (taming / LDM: 1e4).
    adaptive_max: float = field(default=1e4, metadata=check(gt=0))


@dataclass
class VFConfig:
    """VA-VAE's vision-foundation alignment loss (arXiv:2501.01423; docs/methods.md (6.4)-(6.6))."""

    enabled: bool = True
    # The frozen feature network, behind the evaluation feature networks' interface. effnet-lite0 is
    # the offline default; dinov2 (the paper's) needs vf.weights, a local checkpoint file.
    network: str = field(default="effnet-lite0", metadata=check(choices=("effnet-lite0", "dinov2")))
    weights: Path | None = None
    # Which of the network's feature_maps aligns with the latent; None = the network's default
    # (effnet-lite0: the stride-16 map, 112 channels; dinov2: the last block's patch tokens).
    layer: int | None = None
    # Image size fed to the network; None = latent grid x the map's stride, so the map lands on the
    # latent grid without resampling (DINOv2/14 on a 16x16 grid: 224, the paper's setting).
    input_size: int | None = field(default=None, metadata=check(gt=0))
    resample: str = field(default="area", metadata=check(choices=("area", "bilinear")))
    weight: float = field(default=0.1, metadata=check(ge=0))  # vf_weight (x the adaptive weight)
    adaptive: bool = True  # w = ||grad L_rec|| / (||grad L_vf|| + 1e-4) at the encoder's last layer
    adaptive_max: float = field(default=1e8, metadata=check(gt=0))
    cos_margin: float = field(default=0.5, metadata=check(ge=0, le=2))  # m1 of the marginal cosine loss
    distmat_margin: float = field(default=0.25, metadata=check(ge=0, le=2))  # m2 of the distance-matrix loss
    cos_weight: float = field(default=1.0, metadata=check(ge=0))
    distmat_weight: float = field(default=1.0, metadata=check(ge=0))
    # The distance matrix of the latent side: of the projected latent z' (public code) or of z itself.
    distmat_on: str = field(default="projected", metadata=check(choices=("projected", "latent")))

    def check(self) -> None:
        if self.enabled and self.network == "dinov2" and self.weights is None:
            raise ConfigError("vf.network=dinov2 needs vf.weights=PATH (a local DINOv2 checkpoint; no weights ship "
                              "offline), or use vf.network=effnet-lite0 (offline default)")


@dataclass
class KLAdamConfig(OptimConfig):
    """Adam betas (0.5, 0.9), lr 1e-4 unscaled, no clipping (LDM's KL-VAE)."""

    kind: str = field(default="adam", metadata=check(choices=("adam", "adamw")))
    lr: float = field(default=1e-4, metadata=check(gt=0))
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float | None = field(default=None, metadata=check(gt=0))


@dataclass
class KLOptimConfig:
    ae: KLAdamConfig = field(default_factory=KLAdamConfig)
    disc: KLAdamConfig = field(default_factory=KLAdamConfig)


@dataclass
class KLRunConfig(TokenizerRun):
    kind: str = field(default="kl", metadata=check(choices=("kl",)))
    data: DataConfig = field(default_factory=DataConfig)
    model: KLModelConfig = field(default_factory=KLModelConfig)
    loss: KLLossConfig = field(default_factory=KLLossConfig)
    vf: VFConfig = field(default_factory=VFConfig)
    optim: KLOptimConfig = field(default_factory=KLOptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def label(self) -> str:
        """A short name for tables and figures, e.g. "kl f4d16 +VF"."""
        return f"kl f{self.model.downsample_factor}d{self.model.latent_channels}" + (" +VF" if self.vf.enabled else "")

    def study_columns(self) -> dict:
        """What a study's results table records about this tokenizer beyond its kind and grid."""
        return {"codebook_size": None, "latent_channels": self.model.latent_channels, "crt": False, "vf": self.vf.enabled}

    def factor_source(self) -> str:
        return f"model.spec={self.model.spec}"


__all__ = ["parse_spec", "KLModelConfig", "KLLossConfig", "VFConfig", "KLAdamConfig", "KLOptimConfig", "KLRunConfig"]
