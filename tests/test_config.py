from dataclasses import dataclass, field

import pytest

from twostage.config import ConfigError, check, config_hash, load, parse_overrides, to_dict
from twostage.engine.config import TrainConfig


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
