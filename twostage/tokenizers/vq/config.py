"""Configuration of a VQ tokenizer run: `VQRunConfig` and its sections.

    cfg = twostage.config.load(VQRunConfig, "vq_fmnist_f8", ["model.codebook_size=4096"])

Defaults are the LlamaGen VQ-16 recipe (LlamaGen arXiv:2406.06525; docs/methods.md §2) and the CRT paper's settings (arXiv:2412.16326; docs/methods.md §3);
every open choice of the CRT method is an option here with the documented default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twostage.config import ConfigError, check
from twostage.data.config import DataConfig
from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig
from twostage.tokenizers.config import LossConfig, MonitorConfig, TokenizerRun


@dataclass
class VQConfig:
    """The autoencoder and its quantizer."""

    in_channels: int = field(default=3, metadata=check(choices=(1, 3)))
    out_channels: int = field(default=3, metadata=check(choices=(1, 3)))
    base_channels: int = field(default=128, metadata=check(gt=0))
    # One entry per resolution level; f = 2 ** (len - 1): (1,1,2,2,4) f16, (1,2,2,4) f8, (1,2,4) f4, (1,2) f2.
    channel_mult: tuple[int, ...] = field(default=(1, 1, 2, 2, 4), metadata=check(gt=0))
    enc_res_blocks: int = field(default=2, metadata=check(gt=0))
    dec_res_blocks: int = field(default=3, metadata=check(gt=0))
    z_channels: int = field(default=256, metadata=check(gt=0))
    norm_groups: int = field(default=32, metadata=check(gt=0))
    attn_heads: int = field(default=1, metadata=check(gt=0))
    mid_attn: bool = True
    dropout: float = field(default=0.0, metadata=check(ge=0, lt=1))
    codebook_size: int = field(default=16384, metadata=check(ge=2))
    code_dim: int = field(default=8, metadata=check(gt=0))
    l2_norm: bool = True  # cosine lookup: latent and codes normalized before the search
    commit_weight: float = field(default=0.25, metadata=check(ge=0))
    codebook_weight: float = field(default=1.0, metadata=check(ge=0))
    entropy_weight: float = field(default=0.0, metadata=check(ge=0))
    entropy_temperature: float = field(default=0.01, metadata=check(gt=0))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def check(self) -> None:
        if not self.channel_mult:
            raise ConfigError("model.channel_mult must have at least one level")


@dataclass
class CRTConfig:
    """Causal regularizer (CRT, arXiv:2412.16326; docs/methods.md (3.1)-(3.2) and the §3 table of open choices)."""

    enabled: bool = False
    weight: float = field(default=4.0, metadata=check(ge=0))
    ramp_steps: int = field(default=1000, metadata=check(ge=0))  # linear ramp of the weight from 0
    layers: int = field(default=2, metadata=check(ge=1))
    width: int = field(default=256, metadata=check(gt=0))
    heads: int = field(default=4, metadata=check(gt=0))
    mlp_ratio: float = field(default=4.0, metadata=check(gt=0))
    positions: str = field(default="learned", metadata=check(choices=("learned", "rope2d")))
    normalize: bool = True  # loss on l2-normalized latents (raw latents let the encoder shrink the norm)
    stop_grad_target: bool = False  # detach the target side (the paper leaves this open; default off)
    dropout: float = field(default=0.0, metadata=check(ge=0, lt=1))
    # Class conditioning of g (open in the paper; default none): > 0 = number of classes of the data.
    num_classes: int = field(default=0, metadata=check(ge=0))

    def check(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"crt.width={self.width} must be divisible by crt.heads={self.heads}")
        if self.positions == "rope2d" and (self.width // self.heads) % 4:
            raise ConfigError("crt.positions=rope2d needs a head dimension (width/heads) divisible by 4")


def _adam() -> OptimConfig:
    return OptimConfig(kind="adam", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0)


@dataclass
class TokenizerOptimConfig:
    ae: OptimConfig = field(default_factory=_adam)
    disc: OptimConfig = field(default_factory=_adam)
    crt: OptimConfig = field(
        default_factory=lambda: OptimConfig(kind="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=1.0)
    )


@dataclass
class VQRunConfig(TokenizerRun):
    # The kind names this config class in twostage/registry.py; a run folder's config.yaml records it.
    kind: str = field(default="vq", metadata=check(choices=("vq",)))
    data: DataConfig = field(default_factory=DataConfig)
    model: VQConfig = field(default_factory=VQConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    crt: CRTConfig = field(default_factory=CRTConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def label(self) -> str:
        """A short name for tables and figures, e.g. "vq f4 K1024 +CRT"."""
        return f"vq f{self.model.downsample_factor} K{self.model.codebook_size}" + (" +CRT" if self.crt.enabled else "")

    def study_columns(self) -> dict:
        """What a study's results table records about this tokenizer beyond its kind and grid."""
        return {"codebook_size": self.model.codebook_size, "latent_channels": None, "crt": self.crt.enabled, "vf": False}

    def factor_source(self) -> str:
        return f"model.channel_mult has {len(self.model.channel_mult)} levels"


__all__ = ["VQConfig", "CRTConfig", "TokenizerOptimConfig", "VQRunConfig"]
