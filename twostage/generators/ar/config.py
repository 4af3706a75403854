"""Configuration of a stage-2 generator run.

    cfg = twostage.config.load(ARRunConfig, "ar_fmnist_tiny", ["model.size=mini", "train.steps=2000"])

The AR defaults are the LlamaGen GPT recipe (arXiv 2406.06525). Everything that depends on the
token cache (codebook size, number of classes, grid) is read from the cache when training starts and
recorded in the run's model.json, so one preset serves caches of any tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twostage.config import ConfigError, check
from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig

# (layers, width, heads). B..3B are the published LlamaGen GPT shapes (arXiv 2406.06525); the small
# ones are for tests and small data (Fashion-MNIST tokens) and follow the same head width of 32-64.
AR_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "mini": (4, 128, 4),
    "small": (6, 256, 4),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (36, 1280, 20),
    "XXL": (48, 1536, 24),
    "3B": (24, 3200, 32),
}


@dataclass
class ARModelConfig:
    """The AR transformer. `size` picks a shape from AR_SHAPES; layers / width / heads override it."""

    size: str = field(default="B", metadata=check(choices=tuple(AR_SHAPES)))
    layers: int | None = field(default=None, metadata=check(gt=0))
    width: int | None = field(default=None, metadata=check(gt=0))
    heads: int | None = field(default=None, metadata=check(gt=0))
    # SwiGLU hidden = round_up(2 * 4 * width / 3, ffn_multiple_of) (LlamaGen / Llama).
    ffn_multiple_of: int = field(default=256, metadata=check(gt=0))
    token_dropout: float = field(default=0.1, metadata=check(ge=0, lt=1))
    resid_dropout: float = field(default=0.1, metadata=check(ge=0, lt=1))
    ffn_dropout: float = field(default=0.1, metadata=check(ge=0, lt=1))
    attn_dropout: float = field(default=0.0, metadata=check(ge=0, lt=1))
    rope_base: float = field(default=10000.0, metadata=check(gt=0))
    # RoPE of the class token: identity (no position; twostage) or zero (cos = sin = 0, which zeroes its
    # queries and keys in every layer: LlamaGen's table, set by `twostage convert llamagen-gpt`).
    prefix_rope: str = field(default="identity", metadata=check(choices=("identity", "zero")))
    norm_eps: float = field(default=1e-5, metadata=check(gt=0))
    init_std: float = field(default=0.02, metadata=check(gt=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        layers, width, heads = AR_SHAPES[self.size]
        return (self.layers or layers, self.width or width, self.heads or heads)

    @property
    def ffn_hidden(self) -> int:
        width, m = self.shape[1], self.ffn_multiple_of
        hidden = int(2 * 4 * width / 3)
        return m * ((hidden + m - 1) // m)

    def check(self) -> None:
        _, width, heads = self.shape
        if width % heads:
            raise ConfigError(f"model.width={width} is not divisible by model.heads={heads}")
        if (width // heads) % 4:
            # 2D RoPE splits each head in a row half and a column half, each rotated in pairs.
            raise ConfigError(f"the head width {width // heads} (model.width / model.heads) must be a multiple of 4 for 2D RoPE")


@dataclass
class ValConfig:
    """Validation cross-entropy (overall and per token position) at every checkpoint."""

    batch_size: int = field(default=64, metadata=check(gt=0))
    # Cap the samples evaluated (None = the whole validation cache).
    max_samples: int | None = field(default=None, metadata=check(gt=0))


@dataclass
class SampleConfig:
    """Defaults of `generator sample` and of the sample grid written at each checkpoint."""

    # Classifier-free guidance scale (twostage/generators/guidance.py): 1 = none, 0 = unconditional.
    cfg_scale: float = field(default=2.0, metadata=check(ge=0))
    # Sampling step after which CFG stops (None: guide every step).
    cfg_until: int | None = field(default=None, metadata=check(ge=0))
    temperature: float = field(default=1.0, metadata=check(ge=0))
    top_k: int = field(default=0, metadata=check(ge=0))  # 0 keeps all tokens
    top_p: float = field(default=1.0, metadata=check(gt=0, le=1))
    # Samples in the grid written at each checkpoint (0: none). Needs the cache's tokenizer run.
    grid_at_checkpoint: int = field(default=16, metadata=check(ge=0))


def _ar_optim() -> OptimConfig:
    # LlamaGen: AdamW (0.9, 0.95), wd 0.05 on matrices, lr 1e-4 (2e-4 for XL and larger), clip 1.
    return OptimConfig(kind="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=1.0)


@dataclass
class ARRunConfig:
    """A class-conditional AR generator run over a discrete token cache."""

    kind: str = field(default="ar", metadata=check(choices=("ar",)))
    model: ARModelConfig = field(default_factory=ARModelConfig)
    optim: OptimConfig = field(default_factory=_ar_optim)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Probability of replacing the class by the null class while training (for CFG).
    label_dropout: float = field(default=0.1, metadata=check(ge=0, le=1))
    val: ValConfig = field(default_factory=ValConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
