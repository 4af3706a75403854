"""The study results table: one row per finished generator job (contract: twostage/study/__init__.py).

    rows = collect_rows(spec, plan)        # from the jobs' run folders, caches and eval JSONs
    write_table(spec, plan)                # DIR/results.parquet (+ results.csv), atomically

Nothing here is recomputed from models: every value is read from what the stages wrote (config.yaml,
model.json, run.json, val/step_*.json or metrics.jsonl, cache meta.json, eval JSONs, done markers),
except the FLOPs, which twostage/study/flops.py counts from the recorded architecture.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twostage.data.token_cache import unigram_entropy
from twostage.study import flops as flopslib
from twostage.study.plan import Plan
from twostage.study.jobs import (Job, Paths, eval_suffix, generator_cell, job_done, read_marker, tokenizer_cell,
                                 tokenizer_id)
from twostage.study.spec import ResolvedGenerator, StudySpec

SCHEMA = pa.schema([
    ("study", pa.string()), ("run_id", pa.string()), ("tokenizer_id", pa.string()),
    # replicates: runs of one cell differ only in their seeds (tokenizer / generator train.seed, sampling)
    ("tokenizer_cell", pa.string()), ("generator_cell", pa.string()), ("tokenizer_seed", pa.int64()),
    ("generator_seed", pa.int64()), ("eval_seed", pa.int64()),
    ("tokenizer_label", pa.string()), ("generator_label", pa.string()),
    ("tokenizer_kind", pa.string()), ("downsample", pa.int64()), ("tokens_per_image", pa.int64()),
    ("codebook_size", pa.int64()), ("latent_channels", pa.int64()), ("crt", pa.bool_()), ("vf", pa.bool_()),
    ("generator_kind", pa.string()), ("generator_size", pa.string()), ("train_steps", pa.int64()),
    ("batch_size", pa.int64()), ("params", pa.int64()), ("tokens_seen", pa.int64()),
    ("flops_per_token", pa.float64()), ("compute", pa.float64()),
    ("val_loss", pa.float64()), ("val_loss_per_position", pa.list_(pa.float64())),
    ("gfd", pa.float64()), ("gfd_name", pa.string()),
    # less biased / less variable estimates of the same distance, when the evaluation computed them
    ("gfd_low", pa.float64()), ("gfd_high", pa.float64()), ("gfd_inf", pa.float64()), ("gfd_inf_stderr", pa.float64()),
    ("kid", pa.float64()), ("kid_stderr", pa.float64()), ("is_score", pa.float64()), ("precision", pa.float64()),
    ("recall", pa.float64()), ("gen_protocol", pa.string()),
    ("rfd", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()), ("codebook_usage", pa.float64()),
    ("latent_uniformity_gini", pa.float64()), ("latent_uniformity_entropy", pa.float64()),
    ("recon_protocol", pa.string()), ("code_entropy", pa.float64()),
    ("tokenizer_run", pa.string()), ("generator_run", pa.string()), ("samples_npz", pa.string()),
    ("grid_png", pa.string()), ("wall_s_tokenizer", pa.float64()), ("wall_s_generator", pa.float64()),
    ("device", pa.string()),
])

TABLE_FILE, CSV_FILE = "results.parquet", "results.csv"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


SUFFIXES = ("_std", "_stderr", "_low", "_high")  # companions of a metric, not metrics


def _metric(metrics: dict[str, float], prefixes: tuple[str, ...]) -> tuple[str | None, float | None]:
    """The first metric whose name is one of `prefixes` exactly or `prefix-<network>` (not a companion)."""
    for name, value in metrics.items():
        for p in prefixes:
            if (name == p or name.startswith(f"{p}-")) and not name.endswith(SUFFIXES):
                return name, float(value)
    return None, None


def _companion(metrics: dict[str, float], name: str | None, suffix: str) -> float | None:
    value = metrics.get(f"{name}{suffix}") if name else None
    return None if value is None else float(value)


def _wall(job: Job, root: Path) -> float:
    """Seconds of the job's stages, as their done markers record them (the invocation that finished
    each stage: time spent in an interrupted attempt before a resume is not counted)."""
    return float(sum((read_marker(job, s, root) or {}).get("wall_s", 0.0) for s in job.stages))


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _val_loss(gen: ResolvedGenerator, run: Path) -> tuple[float | None, list[float] | None]:
    """The validation loss at the run's last step, and per token position when the kind records it
    (every generator kind writes RUN/val/step_XXXXXXX.json)."""
    path = run / "val" / f"step_{gen.config.train.steps:07d}.json"
    if not path.is_file():
        return None, None
    record = _json(path)
    per_position = record.get("per_position")
    return float(record["loss"]), [float(v) for v in per_position] if per_position else None


@functools.lru_cache(maxsize=256)
def _code_entropy(cache: Path) -> float | None:
    """unigram_entropy of a token cache (None for latents or a cache not written, e.g. deleted)."""
    return unigram_entropy(cache) if (cache / "meta.json").is_file() else None


def _tokenizer_columns(gen: ResolvedGenerator, plan: Plan) -> dict[str, Any]:
    tok = gen.tokenizer
    tid = tokenizer_id(tok)
    cfg = tok.config
    meta_path = plan.root / "caches" / f"{tid}_train" / "meta.json"
    grid = _json(meta_path)["grid"] if meta_path.is_file() else None
    tokens = int(grid[0]) * int(grid[1]) if grid else tok.tokens_per_image
    recon: dict[str, Any] = {}
    recon_path = plan.root / "tokenizers" / tid / "eval" / "recon.json"
    if recon_path.is_file():
        recon = _json(recon_path)
    m = recon.get("metrics", {})
    return {
        "tokenizer_id": tid, "tokenizer_cell": tokenizer_cell(tok), "tokenizer_seed": tok.seed,
        "tokenizer_label": tok.label, "tokenizer_kind": tok.kind,
        "downsample": tok.downsample, "tokens_per_image": tokens,
        **cfg.study_columns(),
        "rfd": _metric(m, ("rFD", "rFID"))[1], "psnr": m.get("PSNR"), "ssim": m.get("SSIM"),
        "codebook_usage": m.get("codebook_usage"),
        # continuous tokenizers (VA-VAE Table 6: lower Gini / higher entropy = more uniform latents)
        "latent_uniformity_gini": m.get("latent_uniformity_gini"),
        "latent_uniformity_entropy": m.get("latent_uniformity_normalized_entropy"),
        "recon_protocol": json.dumps(recon["protocol"]) if "protocol" in recon else None,
        # the context-free loss on the val cache: code_entropy - val_loss is what an AR model gains from context
        "code_entropy": _code_entropy(plan.root / "caches" / f"{tid}_val"),
        # a pretrained tokenizer's own folder (as the spec names it): where its weights come from
        "tokenizer_run": tok.run if tok.pretrained else _rel(plan.root / "tokenizers" / tid, plan.root),
    }


def _generator_columns(gen: ResolvedGenerator, job: Job, plan: Plan, tokens_per_image: int) -> dict[str, Any]:
    """Columns of one generator run (model, compute, validation loss), shared by its evaluation rows."""
    run = job.folder
    info = _json(run / "model.json")  # uniform keys for every generator kind
    batch = int(gen.config.train.batch_size)
    per_token = float(info["train_flops_per_token"])  # per token of the tokenizer's grid
    tokens_seen, compute = flopslib.training_compute(per_token, gen.config.train.steps, batch, tokens_per_image)
    val_loss, per_position = _val_loss(gen, run)
    device = _json(run / "run.json").get("device_name") if (run / "run.json").is_file() else None
    return {
        "run_id": job.id.removeprefix("gen-"), "generator_cell": generator_cell(gen), "generator_seed": gen.seed,
        "generator_label": gen.label, "generator_kind": gen.kind, "generator_size": gen.size,
        "train_steps": int(gen.config.train.steps), "batch_size": batch,
        "params": int(info["non_embedding_parameters"]), "tokens_seen": tokens_seen, "flops_per_token": per_token,
        "compute": compute, "val_loss": val_loss, "val_loss_per_position": per_position,
        "generator_run": _rel(run, plan.root), "device": device,
    }


def _evaluation_columns(spec: StudySpec, job: Job, plan: Plan, seed: int) -> dict[str, Any]:
    """Columns of one evaluation (one sampling seed) of a generator run."""
    paths = Paths(plan.root)
    gid = job.id.removeprefix("gen-")
    suffix = eval_suffix(spec, seed)
    evaluation = _json(paths.gen_json(gid, suffix))
    m = evaluation["metrics"]
    gfd_name, gfd = _metric(m, ("FD", "FID"))
    inf_name, gfd_inf = _metric(m, ("FDinf", "FIDinf"))
    kid_name, kid = _metric(m, ("KID",))
    samples = paths.samples(gid, suffix)
    grid = samples.with_suffix(".png")
    return {
        "eval_seed": seed, "gfd": gfd, "gfd_name": gfd_name, "is_score": _metric(m, ("IS",))[1],
        "gfd_low": _companion(m, gfd_name, "_low"), "gfd_high": _companion(m, gfd_name, "_high"),
        "gfd_inf": gfd_inf, "gfd_inf_stderr": _companion(m, inf_name, "_stderr"),
        "kid": kid, "kid_stderr": _companion(m, kid_name, "_stderr"),
        "precision": _metric(m, ("Precision",))[1], "recall": _metric(m, ("Recall",))[1],
        "gen_protocol": json.dumps(evaluation.get("protocol", {})),
        "samples_npz": _rel(samples, plan.root), "grid_png": _rel(grid, plan.root) if grid.is_file() else None,
    }


def collect_rows(spec: StudySpec, plan: Plan) -> list[dict[str, Any]]:
    """One row per evaluation (sampling seed) of every finished generator job, in grid order
    (tokenizer, tokenizer seed, size, budget, generator seed, evaluation seed)."""
    rows = []
    tok_jobs = {j.id: j for j in plan.tokenizer_jobs}
    # replicas trained as one (generator packs, tokenizer tpacks): each member gets an equal share of the time
    packs = {j.id: j for j in plan.jobs if j.kind in ("pack", "tokenizer-pack")}
    members = {pid: sum(pid in j.deps for j in plan.jobs) for pid in packs}

    def share(job) -> float:
        return sum(_wall(packs[d], plan.root) / members[d] for d in job.deps if d in packs)

    for gen, job in zip(plan.generators, plan.generator_jobs):
        if not job_done(job, plan.root):
            continue
        tok_job = tok_jobs[f"tok-{tokenizer_id(gen.tokenizer)}"]
        run = {"study": spec.name, **_tokenizer_columns(gen, plan)}
        run.update(_generator_columns(gen, job, plan, run["tokens_per_image"]))
        run["wall_s_tokenizer"] = _wall(tok_job, plan.root) + share(tok_job)
        run["wall_s_generator"] = _wall(job, plan.root) + share(job)
        rows += [{**run, **_evaluation_columns(spec, job, plan, seed)} for seed in spec.seeds.eval]
    return rows


def to_arrow(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)


def write_table(spec: StudySpec, plan: Plan) -> Path:
    """DIR/results.parquet and DIR/results.csv (each written to a temporary file, then renamed)."""
    table = to_arrow(collect_rows(spec, plan))
    root = plan.root
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{TABLE_FILE}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, root / TABLE_FILE)
    # CSV has no list type: the per-position losses go in as a JSON list string
    per_pos = pa.array([None if v is None else json.dumps(v) for v in table.column("val_loss_per_position").to_pylist()],
                       pa.string())
    flat = table.set_column(table.schema.get_field_index("val_loss_per_position"), "val_loss_per_position", per_pos)
    tmp = root / f".{CSV_FILE}.tmp-{os.getpid()}"
    pacsv.write_csv(flat, tmp)
    os.replace(tmp, root / CSV_FILE)
    return root / TABLE_FILE


def read_table(root: str | Path) -> pa.Table:
    return pq.read_table(Path(root) / TABLE_FILE)


__all__ = ["SCHEMA", "TABLE_FILE", "CSV_FILE", "collect_rows", "to_arrow", "write_table", "read_table"]
