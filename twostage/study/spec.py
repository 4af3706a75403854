"""The study spec: a YAML file naming the grid of a compression-generation trade-off study.

    spec = load_spec("twostage/presets/study_demo.yaml")        # typed, validated; unknown keys name the closest
    plan = build_plan(spec)                            # every job's resolved config, checked before work

A study multiplies three axes: tokenizers x generator sizes (of the tokenizer's kind: AR for VQ,
LightningDiT for KL) x budgets (generator train.steps). Each tokenizer entry is a preset plus
overrides (`vq_fmnist_f4` with `model.codebook_size=256 crt.enabled=true`, `kl_fmnist_f4d8` with
`model.spec=f4d4 vf.enabled=false`). Overrides are applied in this order, later ones winning:
preset <- `data` <- `tokenizer.overrides` (shared) <- the entry's own overrides <- train.steps.

    name: demo
    data: {image_size: 32}
    tokenizer: {steps: 300, overrides: [loss.perceptual=none], encode_train_limit: 5000}
    tokenizers:
      - {preset: vq_fmnist_f4, label: "vq f4 K1024"}
      - {preset: vq_fmnist_f4, overrides: [crt.enabled=true], label: "vq f4 K1024 +CRT"}
    generators:
      ar: {preset: ar_fmnist_tiny, sizes: [tiny, mini], cfg: 2.0}
    budgets: [200, 400]
    sample: {num: 500}
    eval: {reference: "fashion-mnist:test", reference_max_images: 1000}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from twostage import config as configlib
from twostage.config import ConfigError, check

# tokenizer kind -> the generator kind that trains on its cache
GENERATOR_FOR = {"vq": "ar", "kl": "dit"}


@dataclass
class TokenizerSpec:
    """One point of the tokenizer axis."""

    preset: str
    overrides: list[str] = field(default_factory=list)
    label: str | None = None  # human readable; default e.g. "vq f4 K1024 +CRT"


@dataclass
class TokenizerSettings:
    """What every tokenizer of the study shares: training length, overrides, how much is encoded."""

    steps: int = field(default=20000, metadata=check(gt=0))  # tokenizer train.steps
    overrides: list[str] = field(default_factory=list)
    # Encode only the first N images of a split (None: all). Stage 2 trains on the train cache and
    # reports validation loss on the val cache.
    encode_train_limit: int | None = field(default=None, metadata=check(gt=0))
    encode_val_limit: int | None = field(default=None, metadata=check(gt=0))
    encode_batch_size: int = field(default=256, metadata=check(gt=0))
    num_workers: int = field(default=2, metadata=check(ge=0))  # data loader workers of encode / eval


@dataclass
class GeneratorSpec:
    """The generators trained on one tokenizer kind's caches: a preset, its sizes, sampling settings."""

    preset: str
    sizes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    cfg: float | None = field(default=None, metadata=check(ge=0))  # CFG scale (None: the preset's)
    sample_steps: int | None = field(default=None, metadata=check(gt=0))  # DiT sampler steps (None: preset's)


@dataclass
class GeneratorsSpec:
    ar: GeneratorSpec | None = None
    dit: GeneratorSpec | None = None


@dataclass
class SampleSettings:
    num: int = field(default=10000, metadata=check(gt=0))  # samples per generator for eval gen
    batch_size: int = field(default=64, metadata=check(gt=0))
    seed: int = 0


@dataclass
class EvalSettings:
    reference: str = "fashion-mnist:test"
    # > 0: reference statistics over the first N images only (`eval stats --max-images N`), written
    # once into DIR/reference/ and used by every `eval gen` (the full 10k set takes minutes on a CPU).
    reference_max_images: int | None = field(default=None, metadata=check(gt=1))
    network: str = "effnet-lite0"
    weights: str | None = None  # local weights file of the feature network (inception-v3 / dinov2)
    batch_size: int = field(default=100, metadata=check(gt=0))
    recon_max_images: int | None = field(default=None, metadata=check(gt=1))
    recon_perceptual: bool = True


@dataclass
class StudySpec:
    name: str
    tokenizers: list[TokenizerSpec]
    generators: GeneratorsSpec
    budgets: list[int]
    data: dict[str, Any] = field(default_factory=dict)  # data-section keys for every tokenizer
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def check(self) -> None:
        if not self.tokenizers:
            raise ConfigError("tokenizers: the study needs at least one tokenizer")
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ConfigError(f"budgets={self.budgets!r}: give one or more positive generator train.steps")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets={self.budgets!r} lists a budget twice")
        for kind in ("ar", "dit"):
            g = getattr(self.generators, kind)
            if g is not None and not g.sizes:
                raise ConfigError(f"generators.{kind}.sizes: list at least one model size")
            if g is not None and len(set(g.sizes)) != len(g.sizes):
                raise ConfigError(f"generators.{kind}.sizes={g.sizes!r} lists a size twice")
        if self.generators.ar is not None and self.generators.ar.sample_steps is not None:
            raise ConfigError("generators.ar.sample_steps: an AR generator samples one token per step; "
                              "sample_steps is the DiT sampler's")


def load_spec(source: str | Path | dict, overrides: list[str] = ()) -> StudySpec:
    """A validated StudySpec from a YAML file, a preset name in twostage/presets/ or a dict."""
    return configlib.load(StudySpec, source, list(overrides))


# ---------------------------------------------------------------------------------------------------
# resolving the grid


@dataclass
class ResolvedTokenizer:
    index: int
    kind: str  # vq | kl
    preset: str
    overrides: list[str]  # everything after the preset, as `tokenizer train` takes them
    config: Any  # VQRunConfig | KLRunConfig
    label: str

    @property
    def downsample(self) -> int:
        return int(self.config.model.downsample_factor)

    @property
    def tokens_per_image(self) -> int:
        side = self.config.data.image_size // self.downsample
        return side * side


@dataclass
class ResolvedGenerator:
    tokenizer: ResolvedTokenizer
    kind: str  # ar | dit
    preset: str
    size: str
    budget: int
    overrides: list[str]  # everything after the preset, as `generator train` takes them
    config: Any  # ARRunConfig | DiTRunConfig
    spec: GeneratorSpec

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size} {self.budget} steps"


def _kind(preset: str, overrides: list[str], default: str) -> str:
    """The top-level `kind` of a preset (an override kind=... wins), read before choosing the class."""
    data = yaml.safe_load(configlib.resolve_preset(preset).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{preset}: a config file must hold a mapping of sections")
    return str(configlib.parse_overrides(list(overrides)).get("kind", data.get("kind", default)))


def _tokenizer_class(kind: str, where: str):
    if kind == "vq":
        from twostage.tokenizers.vq.config import VQRunConfig

        return VQRunConfig
    if kind == "kl":
        from twostage.tokenizers.kl.config import KLRunConfig

        return KLRunConfig
    raise ConfigError(f"{where}: kind={kind!r} is not a tokenizer kind; choose one of {sorted(GENERATOR_FOR)}")


def _generator_class(kind: str):
    if kind == "ar":
        from twostage.generators.ar.config import ARRunConfig

        return ARRunConfig
    from twostage.generators.dit.config import DiTRunConfig

    return DiTRunConfig


def default_label(kind: str, cfg: Any) -> str:
    f = cfg.model.downsample_factor
    if kind == "vq":
        return f"vq f{f} K{cfg.model.codebook_size}" + (" +CRT" if cfg.crt.enabled else "")
    return f"kl f{f}d{cfg.model.latent_channels}" + (" +VF" if cfg.vf.enabled else "")


def _data_overrides(data: dict[str, Any]) -> list[str]:
    # JSON is YAML flow syntax, so parse_overrides reads every value back with its type.
    return [f"data.{k}={json.dumps(v)}" for k, v in data.items()]


def resolve_tokenizer(spec: StudySpec, index: int) -> ResolvedTokenizer:
    t = spec.tokenizers[index]
    where = f"tokenizers[{index}] ({t.preset})"
    overrides = [*_data_overrides(spec.data), *spec.tokenizer.overrides, *t.overrides,
                 f"train.steps={spec.tokenizer.steps}"]
    kind = _kind(t.preset, overrides, "vq")
    cls = _tokenizer_class(kind, where)
    try:
        cfg = configlib.load(cls, t.preset, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if getattr(spec.generators, GENERATOR_FOR[kind]) is None:
        raise ConfigError(f"{where} is a {kind} tokenizer but the study has no generators.{GENERATOR_FOR[kind]} "
                          "section to train on its cache")
    return ResolvedTokenizer(index, kind, t.preset, overrides, cfg, t.label or default_label(kind, cfg))


def resolve_generator(spec: StudySpec, tok: ResolvedTokenizer, size: str, budget: int) -> ResolvedGenerator:
    kind = GENERATOR_FOR[tok.kind]
    g: GeneratorSpec = getattr(spec.generators, kind)
    overrides = [*g.overrides, f"model.size={size}", f"train.steps={budget}"]
    where = f"generators.{kind} ({g.preset}, size {size}, {budget} steps)"
    found = _kind(g.preset, overrides, "ar")
    if found != kind:
        raise ConfigError(f"{where}: the preset's kind is {found!r}, but a {tok.kind} tokenizer needs a {kind} generator")
    try:
        cfg = configlib.load(_generator_class(kind), g.preset, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return ResolvedGenerator(tok, kind, g.preset, size, budget, overrides, cfg, g)


def resolve_grid(spec: StudySpec) -> tuple[list[ResolvedTokenizer], list[ResolvedGenerator]]:
    """Every tokenizer and generator config of the study, loaded and validated (nothing runs yet)."""
    toks = [resolve_tokenizer(spec, i) for i in range(len(spec.tokenizers))]
    gens = []
    for tok in toks:
        g: GeneratorSpec = getattr(spec.generators, GENERATOR_FOR[tok.kind])
        for size in g.sizes:
            for budget in spec.budgets:
                gens.append(resolve_generator(spec, tok, size, budget))
    return toks, gens


__all__ = ["StudySpec", "TokenizerSpec", "TokenizerSettings", "GeneratorSpec", "GeneratorsSpec", "SampleSettings",
           "EvalSettings", "ResolvedTokenizer", "ResolvedGenerator", "load_spec", "resolve_grid", "default_label",
           "GENERATOR_FOR"]
