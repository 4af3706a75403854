"""Configuration of a LightningDiT flow-generator run over a latent cache: `DiTRunConfig`.

    cfg = twostage.config.load(DiTRunConfig, "dit_fmnist", ["model.size=B", "model.patch_size=2"])

Defaults are LightningDiT's (arXiv 2501.01423): rectified flow with logit-normal times and the
velocity-direction loss, AdamW lr 2e-4 betas (0.9, 0.95) no weight decay, EMA 0.9999, label dropout
0.1, Euler sampling with timestep shift 0.3 and a CFG interval. As with the AR generator, everything
that depends on the cache (latent channels, grid, classes, latent statistics) is read from the cache
when training starts and recorded in the run's model.json.

Options, off by default (a config without them trains exactly as before, and its config.yaml and
config hash are unchanged: the fields are marked `added`): `flow.shift_base_dim`, RAE's
dimension-dependent time shift (flow.py: `dimension_shift`); the `repa:` section, REPA's representation
alignment of one block's tokens (repa.py); `model.ddt`, the DDT head (model.py: `DDTHead`); and the
architecture fields that make converted LightningDiT checkpoints exact (`model.time_scale`,
`model.pos_order`, `model.ffn_multiple_of`; twostage/convert/lightningdit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twostage.config import ConfigError, check
from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig
from twostage.generators.dit.flow import TIME_SAMPLERS
from twostage.generators.dit.sampler import SAMPLERS

# (layers, width, heads). B / L / XL are the published LightningDiT (= DiT) shapes; tiny and mini are
# for tests and small latents (Fashion-MNIST), S is DiT-S.
DIT_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "mini": (4, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


@dataclass
class DDTConfig:
    """The DDT head (Decoupled Diffusion Transformer, arXiv 2504.05741; RAE's DiT-DH, arXiv 2510.11690):
    `depth` blocks of their own `width` and `heads` after the trunk, on a fresh patch embedding of x_t,
    each token modulated by the trunk's output token at its position plus the time embedding
    (docs/methods.md §7, (7.9)). Defaults: RAE's DiT-DH-XL head (2 blocks of width 2048, 16 heads)."""

    enabled: bool = False
    width: int = field(default=2048, metadata=check(gt=0))
    depth: int = field(default=2, metadata=check(gt=0))
    heads: int = field(default=16, metadata=check(gt=0))


@dataclass
class DiTModelConfig:
    """The network. `size` picks a shape from DIT_SHAPES; layers / width / heads override it."""

    size: str = field(default="B", metadata=check(choices=tuple(DIT_SHAPES)))
    layers: int | None = field(default=None, metadata=check(gt=0))
    width: int | None = field(default=None, metadata=check(gt=0))
    heads: int | None = field(default=None, metadata=check(gt=0))
    patch_size: int = field(default=1, metadata=check(choices=(1, 2, 4)))
    # SwiGLU hidden = round_up(mlp_ratio * width * 2/3, ffn_multiple_of) (LightningDiT: 2/3 of the 4x MLP).
    mlp_ratio: float = field(default=4.0, metadata=check(gt=0))
    qk_norm: bool = False  # RMSNorm on queries and keys per head (LightningDiT's option for large models)
    rope: bool = True  # 2D RoPE on queries and keys
    rope_base: float = field(default=10000.0, metadata=check(gt=0))
    abs_pos: bool = True  # fixed 2D sin-cos position embedding added to the patch tokens (as DiT)
    norm_eps: float = field(default=1e-6, metadata=check(gt=0))
    # SwiGLU hidden = round_up(int(mlp_ratio * width * 2/3), ffn_multiple_of): 8 is ours; LightningDiT's code
    # does not round (1), which differs at widths 1024 and 1792 (2730 against 2736).
    ffn_multiple_of: int = field(default=8, metadata=check(gt=0, added=True))
    # t in [0, 1] is multiplied by this before the 256 sinusoids of the time embedding: 1000 spreads their
    # frequencies over t's range (DiT's integer timesteps); LightningDiT's code feeds t itself (1).
    time_scale: float = field(default=1000.0, metadata=check(gt=0, added=True))
    # Channel halves of the fixed sin-cos position table: [row | col] (ours) or [col | row] (DiT's /
    # LightningDiT's get_2d_sincos_pos_embed, whose first half encodes the column).
    pos_order: str = field(default="row_col", metadata=check(choices=("row_col", "col_row"), added=True))
    ddt: DDTConfig = field(default_factory=DDTConfig, metadata=check(added=True))

    @property
    def shape(self) -> tuple[int, int, int]:
        layers, width, heads = DIT_SHAPES[self.size]
        return (self.layers or layers, self.width or width, self.heads or heads)

    def check(self) -> None:
        _, width, heads = self.shape
        if width % heads:
            raise ConfigError(f"model.width={width} is not divisible by model.heads={heads}")
        if self.rope and (width // heads) % 4:
            raise ConfigError(f"2D RoPE needs a head width (width / heads = {width // heads}) divisible by 4")
        if self.abs_pos and width % 4:
            raise ConfigError(f"the 2D sin-cos position embedding needs model.width={width} divisible by 4")
        d = self.ddt
        if d.enabled and d.width % d.heads:
            raise ConfigError(f"model.ddt.width={d.width} is not divisible by model.ddt.heads={d.heads}")
        if d.enabled and self.rope and (d.width // d.heads) % 4:
            raise ConfigError(f"2D RoPE in the DDT head needs a head width (model.ddt.width / model.ddt.heads = "
                              f"{d.width // d.heads}) divisible by 4")


@dataclass
class FlowConfig:
    """Rectified-flow training objective (time convention: twostage/generators/dit/flow.py)."""

    time_sampling: str = field(default="logit_normal", metadata=check(choices=tuple(TIME_SAMPLERS)))
    logit_mean: float = 0.0
    logit_std: float = field(default=1.0, metadata=check(gt=0))
    direction_weight: float = field(default=1.0, metadata=check(ge=0))  # velocity-direction loss; 0 = MSE only
    # Train on latents normalized per channel with the cache's mean / std (LightningDiT does).
    normalize_latents: bool = True
    # RAE's dimension-dependent time shift (arXiv 2510.11690): alpha = sqrt(m / n), m = latent C*H*W,
    # n = this base dimension (RAE: 4096); applied to the training times and composed with sample.shift on
    # the sampling grid (flow.py: dimension_shift). None: off.
    shift_base_dim: int | None = field(default=None, metadata=check(gt=0))


@dataclass
class RepaConfig:
    """REPA (arXiv 2410.06940): align the tokens after block `layer` with a frozen encoder's features of
    the clean image, through a trained MLP projector, by negative cosine (twostage/generators/dit/repa.py).

    The DiT trains on latents, so the clean image is the cache's tokenizer decoding the clean latent.
    """

    enabled: bool = False
    layer: int = field(default=8, metadata=check(gt=0))  # 1-based: the output of block `layer` (REPA: 8 on XL, 4 on B)
    weight: float = field(default=0.5, metadata=check(ge=0))  # lambda
    projector_dim: int = field(default=2048, metadata=check(gt=0))  # hidden width of the projector MLP
    # Frozen feature network (twostage.backbones.load_feature_network); its spatial feature map is resampled
    # to the DiT's token grid. effnet-lite0 is the offline default; dinov2 (REPA's) needs encoder_weights.
    encoder: str = field(default="effnet-lite0", metadata=check(choices=("effnet-lite0", "dinov2")))
    encoder_weights: Path | None = None
    # Steps after which the term is off (HASTE-style early stop); None: never.
    stop_step: int | None = field(default=None, metadata=check(gt=0))

    def check(self) -> None:
        if self.enabled and self.encoder == "dinov2" and self.encoder_weights is None:
            raise ConfigError("repa.encoder=dinov2 needs repa.encoder_weights=PATH (a local DINOv2 checkpoint), "
                              "or use repa.encoder=effnet-lite0 (offline default)")


@dataclass
class DiTSampleConfig:
    """Defaults of `generator sample` and of the sample grid written at each checkpoint."""

    sampler: str = field(default="euler", metadata=check(choices=tuple(SAMPLERS)))
    steps: int = field(default=250, metadata=check(gt=0))
    shift: float = field(default=0.3, metadata=check(gt=0))  # timestep shift s (data-side convention)
    # Classifier-free guidance scale (twostage/generators/guidance.py): 1 = none, 0 = unconditional.
    cfg_scale: float = field(default=1.0, metadata=check(ge=0))
    # Guidance only for t in [start, end] (t = 1 is data): off for the noisiest part of the path.
    cfg_interval_start: float = field(default=0.1, metadata=check(ge=0, le=1))
    cfg_interval_end: float = field(default=1.0, metadata=check(ge=0, le=1))
    # Samples in the grid written at each checkpoint (0: none). Needs the cache's tokenizer run.
    grid_at_checkpoint: int = field(default=16, metadata=check(ge=0))
    grid_steps: int = field(default=50, metadata=check(gt=0))  # sampling steps of the checkpoint grid

    def check(self) -> None:
        if self.cfg_interval_start > self.cfg_interval_end:
            raise ConfigError(f"sample.cfg_interval_start={self.cfg_interval_start} is after "
                              f"sample.cfg_interval_end={self.cfg_interval_end}")


@dataclass
class DiTValConfig:
    """Validation flow loss at every checkpoint (fixed noise and times, so runs compare)."""

    batch_size: int = field(default=64, metadata=check(gt=0))
    max_samples: int | None = field(default=2048, metadata=check(gt=0))
    seed: int = 0


# The recipe's defaults live in subclasses, not in default factories: a config section given in YAML
# or by an override is built from its class's defaults, so a factory's values would silently vanish as
# soon as one key of the section is set.
@dataclass
class DiTOptimConfig(OptimConfig):
    """AdamW lr 2e-4, betas (0.9, 0.95), no weight decay (LightningDiT)."""

    lr: float = field(default=2e-4, metadata=check(gt=0))
    weight_decay: float = field(default=0.0, metadata=check(ge=0))


@dataclass
class DiTTrainConfig(TrainConfig):
    """Batch 1024 and EMA 0.9999 (LightningDiT)."""

    batch_size: int = field(default=1024, metadata=check(gt=0))
    ema_decay: float | None = field(default=0.9999, metadata=check(gt=0, lt=1))


@dataclass
class DiTRunConfig:
    """A class-conditional LightningDiT flow generator over a continuous latent cache."""

    kind: str = field(default="dit", metadata=check(choices=("dit",)))
    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: DiTOptimConfig = field(default_factory=DiTOptimConfig)
    train: DiTTrainConfig = field(default_factory=DiTTrainConfig)
    label_dropout: float = field(default=0.1, metadata=check(ge=0, le=1))
    val: DiTValConfig = field(default_factory=DiTValConfig)
    sample: DiTSampleConfig = field(default_factory=DiTSampleConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def check(self) -> None:
        layers = self.model.shape[0]
        if self.repa.enabled and self.repa.layer > layers:
            head = " trunk" if self.model.ddt.enabled else ""
            raise ConfigError(f"repa.layer={self.repa.layer} (1-based block index) but the model has {layers}{head} "
                              f"blocks; choose 1..{layers}")


__all__ = ["DIT_SHAPES", "DDTConfig", "DiTModelConfig", "FlowConfig", "RepaConfig", "DiTOptimConfig", "DiTTrainConfig", "DiTSampleConfig", "DiTValConfig", "DiTRunConfig"]
