"""Typed configuration: dataclasses, YAML presets and `section.key=value` overrides.

Every trainable part declares its settings as (nested) dataclasses. This module turns a YAML file plus
command-line overrides into an instance of such a dataclass and validates it completely before any
work starts: an unknown key names itself and the closest valid key, a wrong type or an out-of-range
value (NaN and inf included) names the value and the field. A section given in part keeps the field's
own default for the keys it leaves out, including values set by a `default_factory`. Range and choice
constraints live beside the field:

    lr: float = field(default=1e-4, metadata=check(gt=0))
    schedule: str = field(default="cosine", metadata=check(choices=("constant", "cosine")))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from twostage.common.atomic import write_text_atomic
from twostage.common.errors import UserError

T = TypeVar("T")

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased so that the message says what to change."""


def check(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    added: bool = False,
) -> dict[str, Any]:
    """Field metadata describing the allowed values of a config field.

    `added=True` marks a field added after run folders and studies existed: `to_dict` leaves it out
    while it holds its default, so a saved `config.yaml` and `config_hash` stay what they were (older
    runs resume, study job ids stay the same) until someone sets it."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "added": added}


# ---------------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build and validate a config dataclass from a (possibly partial) nested dict."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(_join(where, key), key, list(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = data[name]
        if value is None and dataclasses.is_dataclass(hints[name]):
            value = {}  # an empty YAML section (`optim:`) means its defaults, as an absent one does
        if isinstance(value, dict) and (default := _default_instance(f)) is not None:
            # A section given in part starts from the field's own default (e.g. the instance a
            # default_factory builds with a recipe's values), not from its class's bare defaults. The
            # merged dict is then complete one level down, so this holds at every depth.
            value = merge(to_dict(default), value)
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None
    validate(obj, where)
    return obj


def _default_instance(f: dataclasses.Field) -> Any:
    """The dataclass instance a field defaults to, or None when its default is not a dataclass."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def validate(obj: Any, where: str = "") -> None:
    """Check every field's constraints and that its floats are finite (recursively); raise ConfigError
    naming the first bad value."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = _join(where, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, path)
            continue
        _check_finite(value, path)
        meta = f.metadata
        if not meta or value is None:
            continue
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ConfigError(f"{path}={value!r} is not allowed; choose one of {list(meta['choices'])}")
        for op, bad, text in (
            ("ge", lambda v, b: v < b, ">="),
            ("gt", lambda v, b: v <= b, ">"),
            ("le", lambda v, b: v > b, "<="),
            ("lt", lambda v, b: v >= b, "<"),
        ):
            bound = meta.get(op)
            if bound is None:
                continue
            items = value if isinstance(value, (tuple, list)) else (value,)
            for item in items:
                if bad(item, bound):
                    raise ConfigError(f"{path}={value!r} is out of range: it must be {text} {bound}")
    post = getattr(obj, "check", None)
    if callable(post):  # cross-field rules, e.g. "disc_start < steps"
        try:
            post()
        except ConfigError as err:
            raise ConfigError(f"{where + ': ' if where else ''}{err}") from None


def _check_finite(value: Any, path: str) -> None:
    # NaN compares false with every bound, so it would pass any range check; inf passes open ones.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}={value!r} is not a finite number")
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}=None is not allowed; give a value of type {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}={value!r} does not fit type {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}={value!r} is not allowed; choose one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list, e.g. [1, 2]")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}={value!r} must have exactly {len(args)} items")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, where): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r} must be a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}={value!r} must be a path")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{path}'{hint} Valid keys here: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ---------------------------------------------------------------------------------------------------
# dataclass -> dict, YAML files, overrides


def to_dict(obj: Any) -> Any:
    """A plain (YAML-safe) nested dict of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("added") and _is_default(f, getattr(obj, f.name)))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys, the override syntax ({"train": {"lr": 1}} ->
    {"train.lr": 1}); a value that is not a dict is {prefix or "value": d}."""
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return f.default is not dataclasses.MISSING and value == f.default


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=2e-4", "model.channels=[1,2]"] into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has no key before '='")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override '{item}': the value is not valid YAML ({problem}); quote it or fix it") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_preset(name_or_path: str | Path) -> Path:
    """A YAML path as given, or a preset name looked up in twostage/presets/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / f"{name_or_path}.yaml", PRESET_DIR / str(name_or_path)):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    close = difflib.get_close_matches(str(name_or_path), known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a preset in {PRESET_DIR}.{hint} "
        f"Presets: {', '.join(known) or 'none'}"
    )


def _read_yaml(path: Path, via: list[str] = ()) -> Any:
    """The YAML document in `path` ({} when empty); a syntax error is a ConfigError naming the file,
    the line and the column (and, for a `base:` file, the files that led to it)."""
    chain = f" (reached through base: from {' -> '.join(via)})" if via else ""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}{chain}: not a UTF-8 text file; a config must be YAML") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            context = f"{context} that starts on line {start.line + 1}, column {start.column + 1}"
        what = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{path}{at}{chain}: invalid YAML: {what}") from None


def read_source(source: str | Path | dict | None) -> dict[str, Any]:
    """The nested dict a config source describes, before defaults: a dict as given, or a YAML file /
    preset with its `base:` chain resolved (`base: vq_fmnist_f4` = that preset, then this file's keys
    merged over it). The `base` key itself is consumed here."""
    if source is None:
        return {}
    if isinstance(source, dict):
        data, where = dict(source), "config"
    else:
        path = resolve_preset(source)
        data, where = _read_yaml(path), str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    seen: list[str] = []
    while "base" in data:
        base = data.pop("base")
        if not isinstance(base, str):
            raise ConfigError(f"{where}: base={base!r} must name a preset or a YAML file")
        if base in seen:
            raise ConfigError(f"{where}: the base chain {' -> '.join([*seen, base])} loops")
        seen.append(base)
        parent_path = resolve_preset(base)
        parent = _read_yaml(parent_path, via=[where, *seen[:-1]])
        if not isinstance(parent, dict):
            raise ConfigError(f"{parent_path}: the top level must be a mapping of sections")
        data = merge(parent, data)
    return data


def load(cls: type[T], source: str | Path | dict | None = None, overrides: list[str] = ()) -> T:
    """Load a config: defaults <- YAML file or preset (or dict) <- overrides; validated."""
    data = merge(read_source(source), parse_overrides(list(overrides)))
    return from_dict(cls, data)


def save(obj: Any, path: str | Path) -> None:
    """The config as YAML, written atomically (complete or not at all; the old file stays on a failure)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def config_hash(obj: Any) -> str:
    """A stable short hash of a config, for keying runs and caches."""
    import hashlib

    text = yaml.safe_dump(to_dict(obj), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "ConfigError",
    "check",
    "from_dict",
    "validate",
    "to_dict",
    "flatten",
    "parse_overrides",
    "merge",
    "load",
    "save",
    "config_hash",
    "resolve_preset",
    "read_source",
]
