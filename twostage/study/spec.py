"""The study spec: a YAML file naming the grid of a compression-generation trade-off study.

    spec = load_spec("twostage/presets/study_demo.yaml")        # typed, validated; unknown keys name the closest
    plan = build_plan(spec)                            # every job's resolved config, checked before work

A study multiplies three axes: tokenizers x generator sizes (of the generator kind that trains on the
tokenizer's cache, twostage/registry.py: AR for VQ, LightningDiT for KL) x budgets (generator train.steps). Each tokenizer entry is a preset plus
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


from twostage import config as configlib
from twostage import registry
from twostage.config import ConfigError, check
from twostage.generators.commands import LABEL_SAMPLING


@dataclass
class TokenizerSpec:
    """One point of the tokenizer axis: a preset the study trains, or a finished run it only reads."""

    preset: str | None = None
    # A tokenizer run folder (e.g. a converted published checkpoint) instead of a preset: no training;
    # the study encodes and evaluates it as it is (twostage/study/pretrained.py). tokenizer.steps,
    # tokenizer.overrides and seeds.tokenizer (one run: its first seed only) do not apply; `data:` does.
    run: str | None = None
    overrides: list[str] = field(default_factory=list)
    label: str | None = None  # human readable; default e.g. "vq f4 K1024 +CRT"
    # Overrides of every generator trained on this entry's caches (after generators.<kind>.overrides): a
    # generator variant (e.g. [repa.enabled=true]) as a cell of its own. Its tokenizer run and caches are
    # shared with every entry of the same tokenizer config (one tokenizer job); default label e.g.
    # "kl f4d16 / dit +REPA".
    generator_overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How messages name the entry: its preset or its run folder."""
        return self.preset if self.run is None else f"run {self.run}"


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
    cfg: float | None = field(default=None, metadata=check(ge=0))  # CFG scale (None: the preset's; 1: none)
    # Sampler steps (None: the preset's), for kinds whose sampler takes steps (a flow's ODE steps).
    sample_steps: int | None = field(default=None, metadata=check(gt=0))


@dataclass
class SampleSettings:
    num: int = field(default=10000, metadata=check(gt=0))  # samples per generator for eval gen
    batch_size: int = field(default=64, metadata=check(gt=0))
    # Class labels of the samples (`generator sample --labels`): balanced (equal counts per class), or
    # train (the training cache's class proportions: for a reference with unequal classes, e.g. emoji).
    labels: str = field(default="balanced", metadata=check(choices=LABEL_SAMPLING))


SEED_DESIGNS = ("crossed", "paired")
# generator keys the grid sets on every run (after all overrides), and where a spec sets them
AXIS_KEYS = {"model.size": "generators.<kind>.sizes", "train.steps": "budgets", "train.seed": "seeds.generator"}


@dataclass
class SeedSettings:
    """Replicates: three separate sources of variance (docs/methods.md §9), each its own list.

    tokenizer  train.seed of every tokenizer (each seed is a separate tokenizer run and cache)
    generator  train.seed of every generator run (runs of one seed on two tokenizers are paired)
    eval       sampling seeds: each generator run draws and scores one samples file per seed
    design     "crossed": every generator seed on every tokenizer seed (len(tokenizer) x len(generator)
               runs per cell; the report separates the two variances); "paired": the i-th generator seed
               on the i-th tokenizer seed only (equal lengths; one run per tokenizer seed, a third of
               the crossed 3 x 3 cost). Paired is the cheaper design when tokenizer seeds dominate the
               variance (they moved FD and validation loss 93-98% in the 3 x 3 study_crt of
               results/study_crt_3x3_partial): averaging generator seeds inside a tokenizer seed then
               buys little, and the interval's degrees of freedom come from tokenizer seeds either way.
    """

    tokenizer: list[int] = field(default_factory=lambda: [0])
    generator: list[int] = field(default_factory=lambda: [0])
    eval: list[int] = field(default_factory=lambda: [0])
    design: str = "crossed"

    def check(self) -> None:
        for name in ("tokenizer", "generator", "eval"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"seeds.{name}: list at least one seed")
            if len(set(values)) != len(values):
                raise ConfigError(f"seeds.{name}={values!r} lists a seed twice")
        if self.design not in SEED_DESIGNS:
            raise ConfigError(f"seeds.design={self.design!r}: use one of {', '.join(SEED_DESIGNS)}")
        if self.design == "paired" and len(self.generator) != len(self.tokenizer):
            raise ConfigError(f"seeds.design=paired pairs the i-th generator seed with the i-th tokenizer seed: "
                              f"list as many generator seeds ({self.generator}) as tokenizer seeds "
                              f"({self.tokenizer}), or use design: crossed")

    def generator_seeds(self, tokenizer_seed: int) -> list[int]:
        """The generator seeds trained on the tokenizer run of `tokenizer_seed`."""
        if self.design == "paired":
            return [self.generator[self.tokenizer.index(tokenizer_seed)]]
        return list(self.generator)



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
    generators: dict[str, GeneratorSpec]  # generator kind (twostage/registry.py) -> its spec
    budgets: list[int]
    data: dict[str, Any] = field(default_factory=dict)  # data-section keys for every tokenizer
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    seeds: SeedSettings = field(default_factory=SeedSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    # How generator runs train: "separate" (a job each) or "replicas" (the runs of one grid point that
    # differ only in seed or in a same-shaped tokenizer train as one stacked run, twostage/study/packs.py;
    # the same runs and results, at about the cost of one run per group on a GPU).
    generator_training: str = field(default="separate", metadata=check(choices=("separate", "replicas")))
    # How the budgets of a grid point are trained: "separate" (a run each) or "longest" (one run of the
    # largest budget, the others cut from its checkpoints: exact for a constant schedule after warmup,
    # refused otherwise; twostage/study/branches.py).
    budget_runs: str = field(default="separate", metadata=check(choices=("separate", "longest")))
    # How the seeds of a tokenizer config train: "separate" (a job each) or "replicas" (one joint run of
    # stacked replicas per config, twostage/study/packs.py; VQ only, discriminator starting after the run).
    tokenizer_training: str = field(default="separate", metadata=check(choices=("separate", "replicas"), added=True))

    def check(self) -> None:
        if not self.tokenizers:
            raise ConfigError("tokenizers: the study needs at least one tokenizer")
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ConfigError(f"budgets={self.budgets!r}: give one or more positive generator train.steps")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets={self.budgets!r} lists a budget twice")
        for kind, g in self.generators.items():
            where = f"generators.{kind}"
            registry.generator_kind(kind, where)
            if not g.sizes:
                raise ConfigError(f"{where}.sizes: list at least one model size")
            if len(set(g.sizes)) != len(g.sizes):
                raise ConfigError(f"{where}.sizes={g.sizes!r} lists a size twice")
            if g.sample_steps is not None and "steps" not in registry.generator_kind(kind).options:
                raise ConfigError(f"{where}.sample_steps: a {kind} generator's sampler takes no steps option "
                                  "(an AR generator samples one token per step)")
        for i, t in enumerate(self.tokenizers):
            if (t.preset is None) == (t.run is None):
                raise ConfigError(f"tokenizers[{i}]: give either `preset` (a tokenizer to train) or `run` (a "
                                  f"trained tokenizer run folder), {'not both' if t.run else 'one of them'}")
            if t.run is not None:
                from twostage.study.pretrained import check_run_folder

                check_run_folder(t.run, f"tokenizers[{i}].run")
                if t.overrides:  # the weights are fixed: a changed model or loss section could not apply
                    raise ConfigError(f"tokenizers[{i}] (run {t.run}).overrides: a pretrained run is used as it "
                                      f"is; remove {t.overrides!r} (the study's data: keys do apply)")
            for item in t.generator_overrides:
                key = item.split("=", 1)[0].strip()
                if "=" not in item:
                    raise ConfigError(f"tokenizers[{i}] ({t.name}).generator_overrides: '{item}' must look like "
                                      "section.key=value")
                if key in AXIS_KEYS:  # set per grid point after the overrides: the entry's value would be lost
                    raise ConfigError(f"tokenizers[{i}] ({t.name}).generator_overrides: {key} is a study axis "
                                      f"({AXIS_KEYS[key]}); remove '{item}'")


def load_spec(source: str | Path | dict, overrides: list[str] = ()) -> StudySpec:
    """A validated StudySpec from a YAML file, a preset name in twostage/presets/ or a dict."""
    return configlib.load(StudySpec, source, list(overrides))


# ---------------------------------------------------------------------------------------------------
# resolving the grid


@dataclass
class ResolvedTokenizer:
    index: int  # the entry in spec.tokenizers: one "cell" of the tokenizer axis, whatever the seed
    kind: str  # a tokenizer kind of twostage/registry.py
    preset: str  # for a pretrained run: its folder
    overrides: list[str]  # everything after the preset, as `tokenizer train` takes them (pretrained: data keys)
    config: Any  # the kind's run config (pretrained: the run's config.yaml with the study's data keys)
    label: str  # the cell's label (with generator overrides: e.g. "kl f4d16 / dit +REPA")
    seed: int = 0  # train.seed (pretrained: the study's first tokenizer seed, a row label only)
    generator_overrides: list[str] = field(default_factory=list)  # the entry's, for its generators
    run: str | None = None  # a pretrained tokenizer's run folder (None: trained by the study)
    weights_sha256: str | None = None  # sha256 of the weights file the study reads from `run`

    @property
    def pretrained(self) -> bool:
        return self.run is not None

    @property
    def run_label(self) -> str:
        """The tokenizer run's own label: its job may be shared by cells that differ in generator overrides."""
        return self.config.label() if self.generator_overrides else self.label

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
    kind: str  # a generator kind of twostage/registry.py
    preset: str
    size: str
    budget: int
    overrides: list[str]  # everything after the preset, as `generator train` takes them
    config: Any  # the kind's run config
    spec: GeneratorSpec
    seed: int = 0  # train.seed

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size} {self.budget} steps"


def _data_overrides(data: dict[str, Any]) -> list[str]:
    # JSON is YAML flow syntax, so parse_overrides reads every value back with its type.
    return [f"data.{k}={json.dumps(v)}" for k, v in data.items()]


def resolve_tokenizer(spec: StudySpec, index: int, seed: int = 0) -> ResolvedTokenizer:
    t = spec.tokenizers[index]
    if t.run is not None:
        return _resolve_pretrained(spec, index, seed)
    where = f"tokenizers[{index}] ({t.preset}) with train.seed={seed}"
    overrides = [*_data_overrides(spec.data), *spec.tokenizer.overrides, *t.overrides,
                 f"train.steps={spec.tokenizer.steps}", f"train.seed={seed}"]
    kind, cfg, gen = _tokenizer_config(spec, t.preset, overrides, where)
    label = t.label or (cfg.label() + (f" / {variant_label(gen.name, t.generator_overrides)}"
                                       if t.generator_overrides else ""))
    return ResolvedTokenizer(index, kind.name, t.preset, overrides, cfg, label, seed, list(t.generator_overrides))


def _tokenizer_config(spec: StudySpec, source: str, overrides: list[str], where: str) -> tuple[Any, Any, Any]:
    """(tokenizer kind, its validated config, the generator kind of its cache), errors naming the entry."""
    try:
        kind, cfg = registry.load_config("tokenizer", source, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    gen = registry.generator_for(kind)
    if gen.name not in spec.generators:
        raise ConfigError(f"{where} is a {kind.name} tokenizer but the study has no generators.{gen.name} "
                          "section to train on its cache")
    return kind, cfg, gen


def _resolve_pretrained(spec: StudySpec, index: int, seed: int) -> ResolvedTokenizer:
    """A `run:` entry: the run's own config with the study's data keys only (as a trained tokenizer gets
    them before its own overrides); tokenizer.steps / tokenizer.overrides concern training, which it skips."""
    from twostage.study.pretrained import weights_sha256

    t = spec.tokenizers[index]
    from twostage.engine.run_files import config_path

    where = f"tokenizers[{index}] (run {t.run})"
    overrides = _data_overrides(spec.data)
    kind, cfg, gen = _tokenizer_config(spec, str(config_path(t.run)), overrides, where)  # a run or an export
    sha = weights_sha256(t.run, where)
    # the folder's name tells a published tokenizer from a trained one of the same config
    label = t.label or (f"{cfg.label()} [{Path(t.run).name}]" + (
        f" / {variant_label(gen.name, t.generator_overrides)}" if t.generator_overrides else ""))
    return ResolvedTokenizer(index, kind.name, str(t.run), overrides, cfg, label, seed, list(t.generator_overrides),
                             run=str(t.run), weights_sha256=sha)


def tokenizer_seeds(spec: StudySpec, index: int) -> list[int]:
    """The tokenizer seeds of an entry: all of seeds.tokenizer, or the first alone for a pretrained run
    (one set of weights; its rows carry that seed, so paired designs pair it with the first generator seed)."""
    return spec.seeds.tokenizer[:1] if spec.tokenizers[index].run is not None else list(spec.seeds.tokenizer)


def variant_label(kind: str, overrides: list[str]) -> str:
    """A generator variant's short name: "dit +REPA +DDT" from its `X.enabled=true|false` switches (+X / -X),
    or its overrides themselves when it has no switch."""
    import yaml

    tags = []
    for item in overrides:
        key, raw = item.split("=", 1)
        if key.endswith(".enabled"):
            on = yaml.safe_load(raw)
            tags.append(("+" if on else "-") + key.removesuffix(".enabled").rsplit(".", 1)[-1].upper())
    return " ".join([kind, *(tags or overrides)])


def resolve_generator(spec: StudySpec, tok: ResolvedTokenizer, size: str, budget: int,
                      seed: int = 0) -> ResolvedGenerator:
    kind = registry.generator_for(tok.kind).name
    g = spec.generators[kind]
    overrides = [*g.overrides, *tok.generator_overrides, f"model.size={size}", f"train.steps={budget}",
                 f"train.seed={seed}"]
    where = f"generators.{kind} ({g.preset}, size {size}, {budget} steps) with train.seed={seed}"
    if tok.generator_overrides:
        where += f" and tokenizers[{tok.index}] ({tok.preset}).generator_overrides={tok.generator_overrides}"
    found = registry.source_kind("generator", g.preset, overrides)
    if found != kind:
        raise ConfigError(f"{where}: the preset's kind is {found!r}, but a {tok.kind} tokenizer needs a {kind} generator")
    try:
        _, cfg = registry.load_config("generator", g.preset, overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return ResolvedGenerator(tok, kind, g.preset, size, budget, overrides, cfg, g, seed)


def resolve_grid(spec: StudySpec) -> tuple[list[ResolvedTokenizer], list[ResolvedGenerator]]:
    """Every tokenizer and generator config of the study, loaded and validated (nothing runs yet)."""
    toks = [resolve_tokenizer(spec, i, s) for i in range(len(spec.tokenizers)) for s in tokenizer_seeds(spec, i)]
    gens = []
    for tok in toks:
        g = spec.generators[registry.generator_for(tok.kind).name]
        for size in g.sizes:
            for budget in spec.budgets:
                gens += [resolve_generator(spec, tok, size, budget, s) for s in spec.seeds.generator_seeds(tok.seed)]
    return toks, gens


__all__ = ["StudySpec", "TokenizerSpec", "TokenizerSettings", "GeneratorSpec", "SampleSettings", "EvalSettings",
           "SeedSettings", "ResolvedTokenizer", "ResolvedGenerator", "load_spec", "resolve_grid", "tokenizer_seeds"]
