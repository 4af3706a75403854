"""The jobs of a study, keyed by config hash, and their stages as `twostage` command lines.

    DIR/tokenizers/<tokenizer_id>/        tokenizer run (train) + eval/recon.json + done/<stage>.json
    DIR/caches/<tokenizer_id>_train/      token / latent caches (encode)
    DIR/caches/<tokenizer_id>_val/
    DIR/generators/<run_id>/              generator run (train) + samples.npz + eval/gen.json + done/
    DIR/packs/<pack_id>/                  generator runs trained as replicas of one joint run (optional)
    DIR/reference/<ref_id>.npz            reference statistics over a subset (eval stats), when asked

tokenizer_id = config_hash(resolved tokenizer config); run_id = config_hash of the resolved generator
config together with its tokenizer_id and the cache settings. Two studies (or two runs of one) that
ask for the same config share the job.

A stage is done when its marker done/<stage>.json exists and records the same command line (paths
inside DIR written as $DIR, so a moved study stays done). A changed command (e.g. more samples)
redoes that stage and every later stage of the job; training itself resumes from the run folder's
latest checkpoint (the engine does that whenever the folder holds one).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twostage import config as configlib
from twostage.common.atomic import write_text_atomic
from twostage.study.spec import ResolvedGenerator, ResolvedTokenizer, StudySpec


@dataclass
class Stage:
    name: str
    argv: list[str]  # what `twostage` is called with (and what a user would type)


@dataclass
class Job:
    id: str  # "tok-<hash>", "gen-<hash>", "ref-<hash>", "pack-<hash>"
    kind: str  # tokenizer | generator | reference | pack (replicas trained as one: study/packs.py)
    folder: Path  # holds done/<stage>.json
    stages: list[Stage]
    deps: list[str] = field(default_factory=list)
    label: str = ""

    def marker(self, stage: str) -> Path:
        return self.folder / "done" / f"{stage}.json"


def fingerprint(argv: list[str], root: Path) -> str:
    """A hash of a command line with the study folder written as $DIR."""
    prefix = str(root)
    text = json.dumps([a.replace(prefix, "$DIR", 1) if a.startswith(prefix) else a for a in argv])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(job: Job, stage: Stage, root: Path) -> dict | None:
    """The marker of a finished stage, or None when the stage is not done (or was run differently)."""
    path = job.marker(stage.name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # never half-written (atomic), but a hand-edited file must not crash the study
    return record if record.get("fingerprint") == fingerprint(stage.argv, root) else None


def write_marker(job: Job, stage: Stage, root: Path, wall_s: float) -> None:
    path = job.marker(stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"job": job.id, "stage": stage.name, "argv": stage.argv, "fingerprint": fingerprint(stage.argv, root),
              "wall_s": wall_s, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(path, json.dumps(record, indent=2))  # a marker exists complete or not at all


def clear_markers_after(job: Job, stage: Stage) -> None:
    """A stage that runs again makes every later stage of its job stale."""
    names = [s.name for s in job.stages]
    for later in names[names.index(stage.name) + 1:]:
        job.marker(later).unlink(missing_ok=True)


def job_done(job: Job, root: Path) -> bool:
    return all(read_marker(job, s, root) is not None for s in job.stages)


# ---------------------------------------------------------------------------------------------------
# building the jobs of a study


def tokenizer_id(tok: ResolvedTokenizer) -> str:
    """The hash of the trained tokenizer's config; a pretrained run's also hashes the sha256 of its weights
    (its config names the architecture, not the weights: new weights must re-run what depends on them)."""
    if tok.pretrained:
        return configlib.config_hash({"pretrained": configlib.to_dict(tok.config), "weights": tok.weights_sha256})
    return configlib.config_hash(tok.config)


def config_without(config: Any, *train_keys: str) -> dict:
    """The config as a dict without these `train` keys: what runs that differ only in them share (a
    grid cell: all seeds; a pack of replicas; the budgets of one run)."""
    data = configlib.to_dict(config)
    data["train"] = {k: v for k, v in data["train"].items() if k not in train_keys}
    return data


def tokenizer_cell(tok: ResolvedTokenizer) -> str:
    """The tokenizer's point on the study grid, the same for all its seeds (replicates share it). An entry
    with generator overrides is a cell of its own (its tokenizer runs are those of the entry without them);
    without them the hash is the tokenizer config's alone, so existing studies keep their cells."""
    tokenizer: dict = config_without(tok.config, "seed")
    if tok.pretrained:  # not the cell of a trained tokenizer of the same config: other weights
        tokenizer = {"pretrained": tokenizer, "weights": tok.weights_sha256}
    if tok.generator_overrides:
        return configlib.config_hash({"tokenizer": tokenizer, "generator_overrides": list(tok.generator_overrides)})
    return configlib.config_hash(tokenizer)


def generator_cell(gen: ResolvedGenerator) -> str:
    """The generator run's point on the grid (tokenizer cell, size, budget, ...), the same for all seeds."""
    return configlib.config_hash({"generator": config_without(gen.config, "seed"),
                                  "tokenizer": tokenizer_cell(gen.tokenizer)})


def cache_settings(spec: StudySpec) -> dict:
    return {"train_limit": spec.tokenizer.encode_train_limit, "val_limit": spec.tokenizer.encode_val_limit,
            "flip": True}


def generator_id(gen: ResolvedGenerator, spec: StudySpec) -> str:
    return configlib.config_hash({"generator": configlib.to_dict(gen.config), "tokenizer_id": tokenizer_id(gen.tokenizer),
                                  "cache": cache_settings(spec)})


@dataclass
class Paths:
    root: Path

    def tokenizer_run(self, tid: str) -> Path:
        return self.root / "tokenizers" / tid

    def cache(self, tid: str, split: str) -> Path:
        return self.root / "caches" / f"{tid}_{split}"

    def pretrained_view(self, tid: str) -> Path:
        """A pretrained run's view: its config with the study's data keys, its checkpoints linked (study/pretrained.py)."""
        return self.tokenizer_run(tid) / "run"

    def recon_json(self, tid: str) -> Path:
        return self.tokenizer_run(tid) / "eval" / "recon.json"

    def generator_run(self, gid: str) -> Path:
        return self.root / "generators" / gid

    def samples(self, gid: str, suffix: str = "") -> Path:
        return self.generator_run(gid) / f"samples{suffix}.npz"

    def gen_json(self, gid: str, suffix: str = "") -> Path:
        return self.generator_run(gid) / "eval" / f"gen{suffix}.json"


    def reference(self, rid: str) -> Path:
        return self.root / "reference" / f"{rid}.npz"


def eval_suffix(spec: StudySpec, seed: int) -> str:
    """File / stage suffix of an evaluation seed: none for the first (a one-seed study keeps the plain
    names), "_s<seed>" for the others."""
    return "" if seed == spec.seeds.eval[0] else f"_s{seed}"


def _network_args(spec: StudySpec) -> list[str]:
    e = spec.eval
    return ["--network", e.network, *(["--weights", e.weights] if e.weights else []), "--batch-size", str(e.batch_size)]


def reference_job(spec: StudySpec, image_size: int, paths: Paths) -> Job | None:
    """`eval stats` over the first reference_max_images images, or None when eval gen uses the full split."""
    e = spec.eval
    if e.reference_max_images is None:
        return None
    rid = configlib.config_hash({"reference": e.reference, "max_images": e.reference_max_images,
                                 "image_size": image_size, "network": e.network, "weights": e.weights})
    argv = ["eval", "stats", e.reference, "--image-size", str(image_size), "--max-images", str(e.reference_max_images),
            *_network_args(spec), "--out", str(paths.reference(rid))]
    return Job(f"ref-{rid}", "reference", paths.root / "reference" / rid, [Stage("stats", argv)],
               label=f"{e.reference} first {e.reference_max_images} images at {image_size}px")


def tokenizer_job(spec: StudySpec, tok: ResolvedTokenizer, paths: Paths) -> Job:
    tid = tokenizer_id(tok)
    folder = run = paths.tokenizer_run(tid)
    t = spec.tokenizer
    if tok.pretrained:  # no training: encode and evaluate a view of the given run (never written into)
        run = paths.pretrained_view(tid)
        stages = [Stage("link", ["study", "link-run", str(tok.run), *tok.overrides, "--out", str(run)])]
    else:
        stages = [Stage("train", ["tokenizer", "train", tok.preset, *tok.overrides, "--out", str(run)])]
    for split, limit in (("train", t.encode_train_limit), ("val", t.encode_val_limit)):
        argv = ["tokenizer", "encode", str(run), "--split", split, "--out", str(paths.cache(tid, split)), "--overwrite",
                "--batch-size", str(t.encode_batch_size), "--num-workers", str(t.num_workers)]
        if limit is not None:
            argv += ["--limit", str(limit)]
        stages.append(Stage(f"encode_{split}", argv))
    recon = ["eval", "recon", str(run), "--split", "val", *_network_args(spec), "--out", str(paths.recon_json(tid))]
    if spec.eval.recon_max_images is not None:
        recon += ["--max-images", str(spec.eval.recon_max_images)]
    if not spec.eval.recon_perceptual:
        recon.append("--no-perceptual")
    stages.append(Stage("recon", recon))
    label = tok.run_label
    if tok.pretrained:  # say where it comes from, and that seeds.tokenizer did not multiply it
        label += f" (pretrained {tok.run}: no training, tokenizer seed {tok.seed} only)"
    return Job(f"tok-{tid}", "tokenizer", folder, stages, label=label)


def generator_job(spec: StudySpec, gen: ResolvedGenerator, paths: Paths, ref: Job | None) -> Job:
    tid, gid = tokenizer_id(gen.tokenizer), generator_id(gen, spec)
    run = paths.generator_run(gid)
    train = ["generator", "train", gen.preset, *gen.overrides, "--tokens", str(paths.cache(tid, "train")),
             "--val-tokens", str(paths.cache(tid, "val")), "--out", str(run)]
    s = spec.sample
    reference = str(paths.reference(ref.id.removeprefix("ref-"))) if ref is not None else spec.eval.reference
    stages = [Stage("train", train)]
    for seed in spec.seeds.eval:  # one samples file and one evaluation per sampling seed
        suffix = eval_suffix(spec, seed)
        sample = ["generator", "sample", str(run), "--num", str(s.num), "--seed", str(seed),
                  "--batch-size", str(s.batch_size), "--out", str(paths.samples(gid, suffix))]
        if gen.spec.cfg is not None:
            sample += ["--cfg", str(gen.spec.cfg)]
        if gen.spec.sample_steps is not None:
            sample += ["--steps", str(gen.spec.sample_steps)]
        # In the argv, so in the stage's marker fingerprint: a changed setting re-samples and re-evaluates;
        # left out at the default, so the markers of existing studies stay valid.
        if s.labels != "balanced":
            sample += ["--labels", s.labels]
        evaluate = ["eval", "gen", str(paths.samples(gid, suffix)), "--ref", reference, *_network_args(spec),
                    "--out", str(paths.gen_json(gid, suffix))]
        stages += [Stage(f"sample{suffix}", sample), Stage(f"eval{suffix}", evaluate)]
    deps = [f"tok-{tid}", *([ref.id] if ref is not None else [])]
    return Job(f"gen-{gid}", "generator", run, stages, deps=deps, label=f"{gen.tokenizer.label} / {gen.label}")


__all__ = ["Stage", "Job", "Paths", "config_without", "eval_suffix", "tokenizer_id", "generator_id", "fingerprint",
           "read_marker", "write_marker", "clear_markers_after", "job_done", "tokenizer_cell", "generator_cell"]
