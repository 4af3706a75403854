import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import get_type_hints

import pytest

from twostage.config import ConfigError, check, config_hash, load, parse_overrides, to_dict
from twostage.engine.config import TrainConfig
from twostage.generators.ar.config import ARRunConfig
from twostage.generators.dit.config import DiTRunConfig
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.vq.config import VQRunConfig


@dataclass
class Model:
    width: int = field(default=64, metadata=check(gt=0))
    mults: tuple[int, ...] = (1, 2)
    norm: str = field(default="rms", metadata=check(choices=("rms", "layer")))
    dropout: float = field(default=0.1, metadata=check(ge=0, lt=1))


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=0.5", "a.c=[1, 2]", "d=true", "e=x"]) == {
        "a": {"b": 0.5, "c": [1, 2]},
        "d": True,
        "e": "x",
    }


def test_load_merges_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  width: 32\ntrain:\n  steps: 5\n  lr_unused_here: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lr_unused_here'"):
        load(Run, path)
    path.write_text("model:\n  width: 32\ntrain:\n  steps: 5\n")
    cfg = load(Run, path, ["model.mults=[1,2,4]", "train.steps=7", "model.dropout=2e-4"])
    assert cfg.model.dropout == 2e-4  # YAML reads 2e-4 as a string; float fields accept it
    assert cfg.model.width == 32 and cfg.model.mults == (1, 2, 4) and cfg.train.steps == 7
    assert to_dict(cfg)["model"]["mults"] == [1, 2, 4]


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError) as err:
        load(Run, None, ["model.widht=3"])
    assert "model.widht" in str(err.value) and "did you mean 'width'" in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.width=0", "model.width=0 is out of range"),
        ("model.width=abc", "model.width='abc' must be an integer"),
        ("model.norm=batch", "model.norm='batch' is not allowed"),
        ("model.dropout=1.0", "model.dropout=1.0 is out of range"),
        ("train.batch_size=10", "not divisible"),
    ],
)
def test_bad_values_are_named(override, fragment):
    extra = ["train.grad_accum=3"] if "batch_size" in override else []
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load(Run, None, [override, *extra])


def test_config_hash_is_stable_and_sensitive():
    a, b = load(Run), load(Run)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load(Run, None, ["model.width=65"]))


@dataclass
class Inner:
    a: int = 1
    b: int = 2


@dataclass
class Middle:
    inner: Inner = field(default_factory=lambda: Inner(a=10, b=20))
    c: int = 3


@dataclass
class Outer:
    middle: Middle = field(default_factory=lambda: Middle(inner=Inner(a=100, b=200), c=30))


def test_partial_sections_start_from_the_outermost_factory_at_every_depth():
    assert load(Outer, None, ["middle.inner.a=5"]) == Outer(Middle(Inner(a=5, b=200), c=30))
    assert load(Outer, {"middle": {"c": 4}}) == Outer(Middle(Inner(a=100, b=200), c=4))
    assert load(Middle, {"inner": {"b": 6}}) == Middle(Inner(a=10, b=6))


# ---------------------------------------------------------------------------------------------------
# The kinds' run configs: sections whose defaults come from a default_factory, non-finite floats

RUN_CONFIGS = {"ar": ARRunConfig, "dit": DiTRunConfig, "vq": VQRunConfig, "kl": KLRunConfig}


def _replace(obj, dotted: str, value):
    """A copy of a nested config dataclass with the field at `dotted` set to `value`."""
    name, _, rest = dotted.partition(".")
    return dataclasses.replace(obj, **{name: _replace(getattr(obj, name), rest, value) if rest else value})


@pytest.mark.parametrize(
    "kind, yaml_section, leaf",
    [
        ("ar", "optim: {lr: 3.0e-4}", "optim.lr"),
        ("dit", "optim: {lr: 3.0e-4}", "optim.lr"),
        ("vq", "optim: {ae: {lr: 3.0e-4}}", "optim.ae.lr"),
        ("kl", "optim: {ae: {lr: 3.0e-4}}", "optim.ae.lr"),
    ],
)
def test_partial_section_keeps_the_default_factory_values(kind, yaml_section, leaf, tmp_path):
    cls = RUN_CONFIGS[kind]
    expected = _replace(cls(), leaf, 3.0e-4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml_section + "\n")
    assert load(cls, path) == expected
    assert load(cls, {"kind": kind}, [f"{leaf}=3.0e-4"]) == expected
    assert load(cls, {"kind": kind, "optim": None}) == cls()  # an empty section is its defaults


def test_partial_section_examples_from_the_bug_report():
    assert load(ARRunConfig, {"kind": "ar"}, ["optim.lr=2e-4"]).optim.weight_decay == 0.05
    assert load(VQRunConfig, {"optim": {"ae": {"lr": 1.0e-3}}}).optim.ae.kind == "adam"


def _factory_sections(cls, prefix=""):
    """Dotted paths of every dataclass-valued field with a default_factory, at any depth."""
    for f in dataclasses.fields(cls):
        if f.default_factory is dataclasses.MISSING:
            continue
        default = f.default_factory()
        if dataclasses.is_dataclass(default):
            yield prefix + f.name
            yield from _factory_sections(type(default), f"{prefix}{f.name}.")


def _leaves(obj, prefix):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def _changed(value):
    """A different value of the same type (it may still break a range or cross-field rule)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(_changed(v) for v in value)
    return value


def _get(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


@pytest.mark.parametrize(
    "kind, section",
    [(kind, section) for kind, cls in RUN_CONFIGS.items() for section in _factory_sections(cls)],
    ids=lambda v: v,
)
def test_overriding_one_leaf_keeps_every_other_factory_value(kind, section):
    cls = RUN_CONFIGS[kind]
    changed = 0
    for leaf, value in _leaves(_get(cls(), section), section + "."):
        # Prefer a new value, so the override must land; keep the default where a rule refuses it.
        for candidate in (_changed(value), value):
            override = f"{leaf}={json.dumps(to_dict(candidate))}"
            try:
                cfg = load(cls, {"kind": kind}, [override])
            except ConfigError:
                continue
            break
        else:
            pytest.fail(f"{override} (the default value) does not load")
        changed += candidate != value
        assert cfg == _replace(cls(), leaf, candidate), override
    assert changed, f"no leaf of {section} could be changed"


@pytest.mark.parametrize(
    "kind, override, key",
    [
        ("ar", "optim.lr=nan", "optim.lr"),
        ("ar", "optim.lr=.nan", "optim.lr"),
        ("ar", "optim.grad_clip=inf", "optim.grad_clip"),
        ("ar", "optim.betas=[0.9, .nan]", "optim.betas[1]"),
        ("ar", "train.ema_decay=-.inf", "train.ema_decay"),
        ("dit", "flow.logit_mean=NaN", "flow.logit_mean"),  # no range check on this field
        ("dit", "train.ema_decay=.inf", "train.ema_decay"),
        ("vq", "optim.ae.lr=-inf", "optim.ae.lr"),
        ("vq", "optim.crt.betas=[.inf, 0.95]", "optim.crt.betas[0]"),
        ("kl", "loss.kl_weight=nan", "loss.kl_weight"),
    ],
)
def test_nonfinite_floats_are_named(kind, override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + r"=-?(nan|inf) is not a finite number"):
        load(RUN_CONFIGS[kind], {"kind": kind}, [override])


def test_nonfinite_floats_in_yaml_and_in_every_float_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"optim\.lr=nan is not a finite number"):
        load(ARRunConfig, path)
    for kind, cls in RUN_CONFIGS.items():
        default = cls()
        for leaf, _ in _leaves(default, ""):
            if _hint(default, leaf) in (float, float | None):  # tuples of floats: the cases above
                with pytest.raises(ConfigError, match=re.escape(leaf) + "=nan is not a finite number"):
                    load(cls, {"kind": kind}, [f"{leaf}=.nan"])


def _hint(obj, dotted: str):
    owner, _, name = dotted.rpartition(".")
    return get_type_hints(type(_get(obj, owner) if owner else obj))[name]
