"""The verbs a researcher scripts; the `twostage` command (twostage/cli.py) is a thin layer over them.

    import twostage as ts

    tok_cfg = ts.load_config("vq_fmnist_f4", ["train.steps=200"])
    ts.train_tokenizer(tok_cfg, "runs/vq")
    ts.encode("runs/vq", "train", "caches/vq_train")
    gen_cfg = ts.load_config("ar_fmnist_tiny", ["train.steps=300"])
    ts.train_generator(gen_cfg, "caches/vq_train", "runs/ar")
    ts.sample("runs/ar", 100, "runs/ar/samples.npz")
    ts.evaluate_generation("runs/ar/samples.npz", "fashion-mnist:test")
    ts.evaluate_reconstruction("runs/vq")

Every verb works for every registered kind (twostage/registry.py): the config's or the run folder's
`kind` picks the implementation. Heavy modules (torch models, datasets) are imported inside the verbs,
so `import twostage` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twostage import registry
from twostage.config import ConfigError


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = (), *,
                group: str | None = None) -> Any:
    """A validated run config from a preset name, a YAML file or a dict, with `section.key=value` overrides.

    The config's `kind` picks the class (e.g. vq, kl, ar, dit); `group` ("tokenizer" or "generator")
    is needed only when the source names no kind (then the group's default kind is used)."""
    if group is None:
        kind = registry.source_kind("tokenizer", source, list(overrides))
        owners = [g for g, table in registry.GROUPS.items() if kind in table]
        if not owners:
            raise ConfigError(f"{source}: kind={kind!r} is neither a tokenizer kind ({', '.join(registry.TOKENIZERS)}) "
                              f"nor a generator kind ({', '.join(registry.GENERATORS)})")
        group = owners[0]
    _, cfg = registry.load_config(group, source, list(overrides))
    return cfg


def train_tokenizer(config: Any, out: str | Path, *, dataset=None, resume_changes: bool = False) -> dict[str, float]:
    """Train (or resume, when `out` holds a checkpoint of the same config) a tokenizer; the last logs.

    resume_changes: accept changed optimizer / schedule settings on resume (recorded in run.json)."""
    from twostage.tokenizers.run import train_run

    return train_run(config, out, dataset=dataset, resume_changes=resume_changes)


def train_tokenizer_replicas(config: Any, outs: list[str | Path], seeds: list[int], pack: str | Path, *,
                             resume_changes: bool = False) -> dict[str, float]:
    """Train K seeds of one VQ tokenizer config as one run of stacked replicas (replica k: train.seed
    seeds[k], run folder outs[k]; the joint run in `pack`, from which it resumes). Each replica's folder
    is a normal run folder; the discriminator must not start within train.steps. See
    twostage/engine/replicas.py for what equals K separate runs."""
    from twostage.tokenizers.run import train_replicas

    return train_replicas(config, outs, seeds, pack, resume_changes=resume_changes)


def encode(run: str | Path, split: str, out: str | Path, **options: Any) -> Path:
    """Encode a split (and its flips) with a trained tokenizer into a stage-2 cache folder.

    options: batch_size, device, precision, flip, limit, overwrite, num_workers, step, weights, dataset
    (see twostage.tokenizers.run.encode_run)."""
    from twostage.tokenizers.run import encode_run

    return encode_run(run, split, out, **options)


def train_generator(config: Any, cache: str | Path, out: str | Path, *, val_cache: str | Path | None = None,
                    resume_changes: bool = False) -> dict[str, float]:
    """Train (or resume) a generator of the config's kind on a cache; the last logs.

    resume_changes: accept changed optimizer / schedule settings on resume (recorded in run.json)."""
    from twostage.generators.training import train_run

    return train_run(config, cache, out, val_cache=val_cache, resume_changes=resume_changes)


def train_generator_replicas(config: Any, caches: list[str | Path], outs: list[str | Path], seeds: list[int],
                             pack: str | Path, *, val_caches: list[str | Path] | None = None,
                             resume_changes: bool = False) -> dict[str, float]:
    """Train K replicas of one generator config as one run (replica k: train.seed seeds[k], cache
    caches[k], run folder outs[k]; the joint run in `pack`, from which it resumes). Each replica's folder
    is a normal run folder; on a GPU, K replicas of a small model cost about one run. See
    twostage/engine/replicas.py for what is the same as K separate runs and what is not."""
    from twostage.generators.training import train_replicas

    return train_replicas(config, caches, outs, seeds, pack, val_caches=val_caches, resume_changes=resume_changes)


def branch_generator(run: str | Path, steps: int, out: str | Path) -> Path:
    """The run folder of `run`'s config trained for `steps` steps, cut from `run`'s checkpoint at that step:
    exactly that run when the learning-rate schedule does not depend on the run's length (refused
    otherwise). See twostage/generators/branch.py."""
    from twostage.generators.branch import branch_run

    return branch_run(run, steps, out)


def sample(run: str | Path, num: int, out: str | Path, **options: Any) -> Path:
    """Draw `num` samples from a generator run into OUT.npz (+ .json, .png grid).

    Shared options: cfg_scale (None = the run's default, 1.0 = no guidance), seed, batch_size, weights,
    step, tokenizer, device, precision, compile, grid, labels ("balanced", the default: equal counts per
    class; "train": the class proportions of the run's training cache); plus the kind's own (registry
    `options`)."""
    kind = registry.run_kind("generator", run)
    return kind.sample_fn()(Path(run), num, Path(out), **options)


def load_tokenizer(run: str | Path, **options: Any):
    """The trained tokenizer of a run folder (encode / decode / reconstruct); options: device, step, weights."""
    from twostage.tokenizers.base import load_tokenizer as load

    return load(run, **options)


def load_generator(run: str | Path, **options: Any):
    """(model, info) of a generator run folder; options: device, weights, step."""
    return registry.run_kind("generator", run).load_fn()(Path(run), **options)


def save_pretrained(run: str | Path, out: str | Path, *, weights: str = "auto", step: int | None = None) -> Path:
    """One step's weights of a tokenizer or generator run (EMA when saved, by default) as a Hub-style folder:
    config.json + model.safetensors (+ pretrained.json, model.json). Every loader, `load_tokenizer`,
    `load_generator`, encode, sample and eval, reads it like a run folder. See twostage/engine/run_files.py."""
    from twostage.engine.run_files import save_pretrained as save

    return save(run, out, weights=weights, step=step)


def evaluate_reconstruction(run: str | Path, **options: Any) -> dict[str, Any]:
    """rFD, PSNR, SSIM, perceptual distance and the kind's code statistics of a tokenizer run, with
    their protocol; written to RUN/eval/ (or `out`). See twostage.metrics.evaluate."""
    from twostage.metrics.evaluate import evaluate_tokenizer_run

    return evaluate_tokenizer_run(run, **options)


def evaluate_generation(samples: str | Path, ref: str, **options: Any) -> dict[str, Any]:
    """FD, sFD, IS-style score, precision / recall of a samples file against a reference, with their
    protocol; written next to the samples (or to `out`). See twostage.metrics.evaluate."""
    from twostage.metrics.evaluate import evaluate_samples_file

    return evaluate_samples_file(samples, ref, **options)


__all__ = ["load_config", "train_tokenizer", "train_tokenizer_replicas", "encode", "train_generator",
           "train_generator_replicas", "branch_generator", "sample", "load_tokenizer", "load_generator",
           "save_pretrained", "evaluate_reconstruction", "evaluate_generation"]
