"""The one place that knows which kinds of tokenizer and generator exist and how they fit together.

A *kind* is a subpackage (twostage/tokenizers/vq, twostage/tokenizers/kl, twostage/generators/ar,
twostage/generators/dit) plus one entry here. The CLI, the Python API (twostage/api.py), the study
runner and the results table look kinds up here and never branch on a kind's name, so a new family
(RAE, VAR, a 1D tokenizer, a masked generator) is one subpackage and one `register_*` call.

Entries name their parts as "module:attribute" strings, imported on first use: listing the kinds (for
`--help` or a config error) costs no torch model imports.

What a tokenizer kind provides (twostage/tokenizers/base.py documents the interface):
    config      the run config dataclass; its `kind` field holds the kind's name
    task        the training Task (twostage/engine/task.py), built from the run config
    tokenizer   the inference class: `from_pretrained(run)`, `encode`, `decode`, `reconstruct`
    cache       what `encode` writes and the generator trains on: "tokens" (ids) or "latents" (floats)

What a generator kind provides:
    config      the run config dataclass (`kind` field as above)
    task        build_task(cfg, cache, out, val_cache=None) -> (Task, training data); trained alone or as
                one of K replicas by twostage/generators/training.py
    load        load_run(run, device=, weights=, step=) -> (model, info)
    sample      sample_run(run, num, out, **options) -> the samples file
    cache       the cache kind it trains on; a study pairs each tokenizer with the generator of its cache
    options     the kind's own options of `generator sample` beyond the shared ones
    replicas_share_cache_if   a boolean config key; where it is true, stacked replicas of the kind
                              must read one cache (differ in seed only)
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twostage.config import ConfigError, parse_overrides, read_source


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class TokenizerKind:
    name: str
    config: str
    task: str
    tokenizer: str
    cache: str  # "tokens" | "latents"
    summary: str  # one line for `--help` and error messages

    def config_class(self) -> type:
        return _resolve(self.config)

    def task_class(self) -> type:
        return _resolve(self.task)

    def tokenizer_class(self) -> type:
        return _resolve(self.tokenizer)


@dataclass(frozen=True)
class GeneratorKind:
    name: str
    config: str
    task: str
    load: str
    sample: str
    cache: str
    summary: str
    options: tuple[str, ...] = ()  # kind-specific keyword options of sample_run
    # Stacked replicas (twostage/engine/replicas.py) run replica 0's loss code for every replica; state of
    # a replica's own cache reaches its loss only as tensors (Task.replica_tensors: the DiT's latent mean
    # and std). A config key (dotted) that, when true, makes the loss read cache state that is not a
    # tensor (the DiT's REPA: a decoder of the cache's tokenizer), so replicas must share one cache.
    replicas_share_cache_if: str = ""

    def replicas_share_cache(self, cfg: Any) -> bool:
        """Whether stacked replicas of this generator config must read one cache (differ in seed only)."""
        value = cfg
        for part in filter(None, self.replicas_share_cache_if.split(".")):
            value = getattr(value, part)
        return bool(self.replicas_share_cache_if) and bool(value)

    def config_class(self) -> type:
        return _resolve(self.config)

    def task_fn(self):
        return _resolve(self.task)

    def load_fn(self):
        return _resolve(self.load)

    def sample_fn(self):
        return _resolve(self.sample)


TOKENIZERS: dict[str, TokenizerKind] = {}
GENERATORS: dict[str, GeneratorKind] = {}
GROUPS = {"tokenizer": TOKENIZERS, "generator": GENERATORS}


def register_tokenizer(kind: TokenizerKind) -> TokenizerKind:
    TOKENIZERS[kind.name] = kind
    return kind


def register_generator(kind: GeneratorKind) -> GeneratorKind:
    GENERATORS[kind.name] = kind
    return kind


def _lookup(group: str, name: str, where: str = "") -> Any:
    table = GROUPS[group]
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    known = ", ".join(f"{k} ({v.summary})" for k, v in table.items())
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}kind={name!r} is not a {group} kind{hint} Known {group} kinds: {known}")


def tokenizer_kind(name: str, where: str = "") -> TokenizerKind:
    return _lookup("tokenizer", name, where)


def generator_kind(name: str, where: str = "") -> GeneratorKind:
    return _lookup("generator", name, where)


def default_kind(group: str) -> str:
    """The kind a config without `kind:` gets: the group's first registered kind (vq, ar)."""
    return next(iter(GROUPS[group]))


def generator_for(tokenizer: str | TokenizerKind) -> GeneratorKind:
    """The generator kind that trains on this tokenizer kind's cache."""
    tok = tokenizer if isinstance(tokenizer, TokenizerKind) else tokenizer_kind(tokenizer)
    for gen in GENERATORS.values():
        if gen.cache == tok.cache:
            return gen
    raise ConfigError(f"no generator kind trains on {tok.cache} caches (tokenizer kind {tok.name!r})")


def source_kind(group: str, source: str | Path | dict | None, overrides: list[str] = ()) -> str:
    """The `kind` of a config (preset, file or dict) before it is loaded; an override `kind=...` wins."""
    kind = parse_overrides(list(overrides)).get("kind") or read_source(source).get("kind") or default_kind(group)
    return str(kind)


def run_kind(group: str, run_dir: str | Path) -> Any:
    """The registered kind of a run folder (from its config.yaml)."""
    from twostage.engine.run_files import recorded_kind

    name = recorded_kind(run_dir) or default_kind(group)
    return _lookup(group, name, f"{run_dir}/config.yaml")


def load_config(group: str, source: str | Path | dict | None, overrides: list[str] = ()) -> Any:
    """A validated run config of the kind the source names: (kind, config)."""
    from twostage import config as configlib

    kind = _lookup(group, source_kind(group, source, overrides), str(source) if source is not None else "")
    return kind, configlib.load(kind.config_class(), source, overrides)


# ---------------------------------------------------------------------------------------------------
# the built-in kinds

register_tokenizer(TokenizerKind(
    name="vq", config="twostage.tokenizers.vq.config:VQRunConfig", task="twostage.tokenizers.vq.task:VQTokenizerTask",
    tokenizer="twostage.tokenizers.vq.tokenizer:VQTokenizer", cache="tokens",
    summary="vector-quantized autoencoder, LlamaGen VQ recipe, optional CRT causal loss"))
register_tokenizer(TokenizerKind(
    name="kl", config="twostage.tokenizers.kl.config:KLRunConfig", task="twostage.tokenizers.kl.task:KLTokenizerTask",
    tokenizer="twostage.tokenizers.kl.tokenizer:KLTokenizer", cache="latents",
    summary="KL-VAE with continuous latents, optional VA-VAE foundation alignment"))
register_tokenizer(TokenizerKind(
    name="rae", config="twostage.tokenizers.rae.config:RAERunConfig",
    task="twostage.tokenizers.rae.task:RAETokenizerTask", tokenizer="twostage.tokenizers.rae.tokenizer:RAETokenizer",
    cache="latents", summary="representation autoencoder: frozen pretrained encoder, trained ViT decoder (RAE)"))
register_generator(GeneratorKind(
    name="ar", config="twostage.generators.ar.config:ARRunConfig", task="twostage.generators.ar.run:build_task",
    load="twostage.generators.ar.run:load_run", sample="twostage.generators.ar.run:sample_run", cache="tokens",
    summary="Llama-style autoregressive transformer over token ids",
    options=("cfg_until", "temperature", "top_k", "top_p", "tokens_only")))
register_generator(GeneratorKind(
    name="dit", config="twostage.generators.dit.config:DiTRunConfig", task="twostage.generators.dit.run:build_task",
    load="twostage.generators.dit.run:load_run", sample="twostage.generators.dit.run:sample_run", cache="latents",
    summary="LightningDiT rectified-flow transformer over continuous latents",
    options=("steps", "sampler", "shift", "cfg_interval"), replicas_share_cache_if="repa.enabled"))


__all__ = ["TokenizerKind", "GeneratorKind", "TOKENIZERS", "GENERATORS", "register_tokenizer", "register_generator",
           "tokenizer_kind", "generator_kind", "default_kind", "generator_for", "source_kind", "run_kind",
           "load_config"]
