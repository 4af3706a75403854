"""Reading a finished (or running) run folder: its config, its model.json and its weights.

Every kind writes the same layout (twostage/engine/trainer.py):

    RUN/config.yaml        the resolved config; its top-level `kind` names the tokenizer or generator kind
    RUN/model.json         what the model is (architecture, the cache it trained on, parameter counts)
    RUN/checkpoints/       step_XXXXXXX/{model,ema}.safetensors with "<module>.<param>" keys, `latest`

`load_run_weights` is the one loader every kind uses: EMA or raw weights (`weights` auto | ema | raw),
the latest or a given step, wrapper prefixes stripped, and the sha256 of the file actually read, so a
cache or a samples file can always be traced to exact weights. `write_model_json` is the one writer:
it refuses to put a second architecture into a run folder that already holds one.

`save_pretrained(run, out)` writes one step's weights as a Hub-style folder, which every loader reads
like a run folder (`load_tokenizer`, `load_generator`, encode, sample, eval, a study's tokenizer):

    OUT/config.json        the run's config (JSON; `kind` as in config.yaml)
    OUT/model.safetensors  the chosen weights ("<module>.<param>" keys, as in a checkpoint)
    OUT/pretrained.json    where they came from: run folder, step, "ema" or "raw", sha256 of the source file
    OUT/model.json         a generator's model record (and any other run record the loaders read)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from twostage.common.device import device_name
from twostage.common.errors import UserError
from twostage.common.hashing import file_sha256
from twostage.engine import checkpoint as ckpt

WEIGHTS = ("auto", "ema", "raw")


class RunLoadError(UserError, RuntimeError):
    """A run folder that cannot be loaded: missing files, no checkpoint, or weights of another model."""


@dataclass
class RunWeights:
    state: dict[str, torch.Tensor]  # module-relative keys ("blocks.0.attn.qkv.weight")
    file: Path  # the safetensors file read
    step: int
    weights: str  # "ema" or "raw"
    checksum: str  # sha256 of `file`


PRETRAINED = "pretrained.json"  # marks a save_pretrained folder (beside config.json + model.safetensors)
RECORDS = ("model.json", "latent_stats.json")  # run records a loader may read, copied by save_pretrained


def is_pretrained(run_dir: str | Path) -> bool:
    """Whether `run_dir` is a folder written by save_pretrained (not a training run folder)."""
    d = Path(run_dir)
    return all((d / name).is_file() for name in ("config.json", "model.safetensors", PRETRAINED))


def config_path(run_dir: str | Path) -> Path:
    """RUN/config.yaml of a run folder, or OUT/config.json of a save_pretrained folder."""
    d = Path(run_dir)
    path = d / ("config.json" if is_pretrained(d) else "config.yaml")
    if not path.is_file():
        raise RunLoadError(f"{run_dir} is not a run folder (it has no config.yaml) nor a pretrained folder "
                           f"(config.json + model.safetensors + {PRETRAINED})")
    return path


def recorded_kind(run_dir: str | Path) -> str:
    """The `kind` in RUN/config.yaml ("" when the config names none)."""
    data = yaml.safe_load(config_path(run_dir).read_text()) or {}
    return str(data.get("kind", "")) if isinstance(data, dict) else ""


def _pretrained_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / PRETRAINED).read_text())


def checkpoint_path(run_dir: str | Path, step: int | None = None) -> Path:
    """RUN/checkpoints/step_XXXXXXX of `step`, or the latest complete one (a pretrained folder: itself)."""
    if is_pretrained(run_dir):
        have = int(_pretrained_record(Path(run_dir))["step"])
        if step is not None and step != have:
            raise RunLoadError(f"{run_dir} holds the weights of step {have} only (a save_pretrained folder)")
        return Path(run_dir)
    folder = Path(run_dir) / "checkpoints"
    if step is not None:
        path = folder / f"step_{step:07d}"
        if not (path / "model.safetensors").is_file():
            have = ", ".join(p.name for p in ckpt.list_checkpoints(folder)) or "none"
            raise RunLoadError(f"{run_dir} has no checkpoint at step {step} (have: {have})")
        return path
    path = ckpt.latest_checkpoint(folder)
    if path is None or not (path / "model.safetensors").is_file():
        raise RunLoadError(f"{run_dir} has no checkpoint (expected {folder}/latest and step_XXXXXXX/); "
                           "train one first, or check the --out folder of the training command")
    return path


def strip_prefixes(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """Keys of `module` without "<module>." and without DDP / torch.compile wrapper prefixes."""
    prefix = f"{module}."
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in out.items()}


def load_run_weights(run_dir: str | Path, module: str, *, weights: str = "auto", step: int | None = None) -> RunWeights:
    """The weights of `module` in a run folder's checkpoint.

    weights: "auto" (EMA when the checkpoint has it, else raw), "ema" (an error without EMA) or "raw".
    """
    if weights not in WEIGHTS:
        raise RunLoadError(f"weights={weights!r}: choose one of {list(WEIGHTS)}")
    path = checkpoint_path(run_dir, step)
    if is_pretrained(run_dir):
        return _pretrained_weights(Path(run_dir), module, weights)
    file = checkpoint_file(path, weights)
    match = ckpt.STEP_DIR.match(path.name)
    return RunWeights(state=_module_state(file, module, run_dir), file=file, step=int(match.group(1)) if match else -1,
                      weights=file.stem, checksum=file_sha256(file))


def checkpoint_file(path: Path, weights: str = "auto") -> Path:
    """The weights file of checkpoint folder `path`: ema.safetensors for "ema" (an error without it) and,
    when the run saved it, for "auto"; model.safetensors for "raw" or a run without EMA."""
    ema = Path(path) / "ema.safetensors"
    if weights == "ema" and not ema.is_file():
        raise RunLoadError(f"{path} has no EMA weights (the run trained without train.ema_decay); use raw weights")
    return ema if weights != "raw" and ema.is_file() else Path(path) / "model.safetensors"


def _module_state(file: Path, module: str, run_dir: str | Path) -> dict[str, torch.Tensor]:
    """`module`'s tensors in a weights file, keys relative to the module; an error when it holds none."""
    from safetensors.torch import load_file

    state = strip_prefixes(load_file(str(file)), module)
    if not state:
        raise RunLoadError(f"{file} holds no '{module}.*' weights: is {run_dir} a run of this kind?")
    return state


def _pretrained_weights(run_dir: Path, module: str, weights: str) -> RunWeights:
    record = _pretrained_record(run_dir)
    if weights != "auto" and weights != record["weights"]:
        raise RunLoadError(f"{run_dir} holds the {record['weights']} weights only (a save_pretrained folder); "
                           f"load it with weights={record['weights']!r} or 'auto', or export the {weights} weights "
                           f"from the run folder {record['source']}")
    file = run_dir / "model.safetensors"
    state = _module_state(file, module, run_dir)
    # `weights` as load_run_weights reports it for a run folder: the stem of the checkpoint file read
    return RunWeights(state=state, file=file, step=int(record["step"]),
                      weights="ema" if record["weights"] == "ema" else "model", checksum=file_sha256(file))


def save_pretrained(run_dir: str | Path, out: str | Path, *, weights: str = "auto", step: int | None = None) -> Path:
    """Write one step's weights of a run folder (EMA by default when saved) as a Hub-style folder `out`
    (see the module docstring); returns `out`. `out` must be new or empty; it is filled through a
    temporary folder and renamed, so a folder with a pretrained.json is complete."""
    import shutil

    import twostage

    run_dir, out = Path(run_dir), Path(out)
    if weights not in WEIGHTS:
        raise RunLoadError(f"weights={weights!r}: choose one of {list(WEIGHTS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; name a new folder")
    source = config_path(run_dir)
    if source.suffix != ".yaml":
        raise UserError(f"{run_dir} is already a save_pretrained folder; copy it instead")
    path = checkpoint_path(run_dir, step)
    file = checkpoint_file(path, weights)
    match = ckpt.STEP_DIR.match(path.name)
    record = {"source": str(run_dir.resolve()), "step": int(match.group(1)) if match else -1,
              "weights": "ema" if file.stem == "ema" else "raw",
              "source_sha256": file_sha256(file), "twostage": twostage.__version__}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(file, tmp / "model.safetensors")
    config = yaml.safe_load(source.read_text()) or {}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=list))
    for name in RECORDS:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, tmp / name)
    (tmp / PRETRAINED).write_text(json.dumps(record, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def load_state_strict(model: torch.nn.Module, run: RunWeights, config_path: Path) -> None:
    """Load exactly; a mismatch is the user's (wrong run or edited config), said in one line."""
    try:
        model.load_state_dict(run.state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise RunLoadError(f"{run.file} does not match the model in {config_path}: {' '.join(first)}") from None


def read_model_json(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "model.json"
    if not path.is_file():
        raise RunLoadError(f"{run_dir} has no model.json: it is not a generator run folder, or training "
                           "never started")
    return json.loads(path.read_text())


def write_model_json(run_dir: str | Path, info: dict[str, Any], arch_keys: Iterable[str]) -> None:
    """Write RUN/model.json atomically; refuse to mix two architectures (`arch_keys` differ) in one folder."""
    run_dir = Path(run_dir)
    path = run_dir / "model.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in arch_keys if _plain(old.get(k)) != _plain(info.get(k))]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)} -> {info.get(k)}" for k in changed)
            raise UserError(f"{run_dir} holds a run of another model ({diff}); train into a new --out folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(path, json.dumps(info, indent=2, default=list))


def run_environment(device: torch.device) -> dict[str, Any]:
    """What run.json records of the software and hardware a run trained with."""
    import platform

    import twostage

    return {"twostage": twostage.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": device_name(device)}


def write_val_record(run_dir: str | Path, step: int, record: dict[str, Any]) -> Path:
    """RUN/val/step_XXXXXXX.json = {"step": step, **record}: what a run measured on held-out data at a
    checkpoint (a generator's loss, a tokenizer's PSNR / rFD), with its protocol where it has one."""
    folder = Path(run_dir) / "val"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.json"
    ckpt.write_text_atomic(path, json.dumps({"step": step, **record}))
    return path


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal after a JSON round trip."""
    return list(value) if isinstance(value, tuple) else value


__all__ = ["RunLoadError", "RunWeights", "WEIGHTS", "recorded_kind", "checkpoint_path", "strip_prefixes",
           "load_run_weights", "load_state_strict", "read_model_json", "write_model_json", "write_val_record",
           "run_environment"]
