"""A synthetic study results table (the contract in twostage/study/__init__.py) with known laws.

Every run's val_loss and gFD follow its tokenizer's law L(C) = L_min + exp(lambda) * C^alpha exactly
(or times log-normal noise), so tests know the parameters a fit must recover and where the
compute-optimal tokenizer changes. Sample grids are small generated PNGs under DIR/samples/.

Replicates (`make_rows(generator_seeds=[0, 1, 2], ...)`): one row per (tokenizer seed, generator seed,
evaluation seed) of every cell, with the replicate columns (tokenizer_cell, generator_cell, the three
seeds) and the evaluation's own uncertainty (gfd_low / gfd_high; gfd_inf, kid and their stderr with
unbiased=True). Multiplicative log-normal effects with known sizes: sd_tokenizer per tokenizer seed
(all its runs), sd_shared per generator seed and budget *shared by every tokenizer* (what pairing by
seed removes), sd_generator per generator run, sd_eval per evaluation. Without any seed list the rows
are those of a one-seed table written before the replicate columns existed. Replicate studies also
write small samples files (DIR/samples/*.npz, grouped by class as the sampler writes them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

GFD_NAME = "FD-EffNetLite0"

# Two VQ tokenizers (AR) whose gFD laws cross inside the swept range, and one KL tokenizer (DiT).
TOKENIZERS = [
    {"tokenizer_id": "tokf8k1024", "tokenizer_label": "vq f8 K1024", "tokenizer_kind": "vq", "downsample": 8,
     "tokens_per_image": 16, "codebook_size": 1024, "latent_channels": None, "crt": False, "vf": False,
     "generator_kind": "ar", "rfd": 12.0, "psnr": 21.0, "ssim": 0.7, "codebook_usage": 0.93,
     "loss": (-0.20, 7.0, 3.0), "gfd": (-0.45, 16.0, 14.0)},
    {"tokenizer_id": "tokf4k1024", "tokenizer_label": "vq f4 K1024 +CRT", "tokenizer_kind": "vq", "downsample": 4,
     "tokens_per_image": 64, "codebook_size": 1024, "latent_channels": None, "crt": True, "vf": False,
     "generator_kind": "ar", "rfd": 4.0, "psnr": 25.0, "ssim": 0.82, "codebook_usage": 0.88,
     "loss": (-0.25, 8.5, 2.0), "gfd": (-0.40, 15.5, 5.0)},
    {"tokenizer_id": "klf4d8vf", "tokenizer_label": "kl f4d8 +VF", "tokenizer_kind": "kl", "downsample": 4,
     "tokens_per_image": 64, "codebook_size": None, "latent_channels": 8, "crt": False, "vf": True,
     "generator_kind": "dit", "rfd": 3.0, "psnr": 27.0, "ssim": 0.86, "codebook_usage": None,
     "loss": (-0.15, 3.0, 0.3), "gfd": (-0.35, 14.0, 6.0)},
]
# Three AR tokenizers with one prediction task (f4, K1024), for verdicts: "+CRT" has a clearly lower gFD
# and val loss than the baseline (factor CRT_EFFECT), the "twin" has exactly the baseline's laws.
CRT_EFFECT = 0.8
_BASE = {"tokenizer_kind": "vq", "downsample": 4, "tokens_per_image": 64, "codebook_size": 1024, "latent_channels": None,
         "vf": False, "generator_kind": "ar", "psnr": 25.0, "ssim": 0.82, "codebook_usage": 0.9,
         "loss": (-0.25, 8.5, 2.0), "gfd": (-0.40, 15.5, 5.0)}
VERDICT_TOKENIZERS = [
    {**_BASE, "tokenizer_id": "base", "tokenizer_label": "baseline", "crt": False, "rfd": 4.0},
    {**_BASE, "tokenizer_id": "crt", "tokenizer_label": "CRT", "crt": True, "rfd": 4.1, "factor": CRT_EFFECT},
    {**_BASE, "tokenizer_id": "twin", "tokenizer_label": "twin", "crt": False, "rfd": 4.0},
]
SIZES = {"small": 2_000_000, "base": 8_000_000}
STEPS = [500, 1000, 2000, 4000, 8000]
BATCH = 64

SCHEMA = pa.schema([
    ("study", pa.string()), ("run_id", pa.string()), ("tokenizer_id", pa.string()),
    ("tokenizer_label", pa.string()), ("generator_label", pa.string()), ("tokenizer_kind", pa.string()),
    ("downsample", pa.int64()), ("tokens_per_image", pa.int64()), ("codebook_size", pa.int64()),
    ("latent_channels", pa.int64()), ("crt", pa.bool_()), ("vf", pa.bool_()),
    ("generator_kind", pa.string()), ("generator_size", pa.string()), ("train_steps", pa.int64()),
    ("batch_size", pa.int64()), ("params", pa.int64()), ("tokens_seen", pa.int64()),
    ("flops_per_token", pa.float64()), ("compute", pa.float64()), ("val_loss", pa.float64()),
    ("val_loss_per_position", pa.list_(pa.float64())), ("gfd", pa.float64()), ("gfd_name", pa.string()),
    ("is_score", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()),
    ("gen_protocol", pa.string()), ("rfd", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()),
    ("codebook_usage", pa.float64()), ("recon_protocol", pa.string()), ("tokenizer_run", pa.string()),
    ("generator_run", pa.string()), ("samples_npz", pa.string()), ("grid_png", pa.string()),
    ("wall_s_tokenizer", pa.float64()), ("wall_s_generator", pa.float64()), ("device", pa.string()),
])
REPLICATE_FIELDS = [
    ("tokenizer_cell", pa.string()), ("generator_cell", pa.string()), ("tokenizer_seed", pa.int64()),
    ("generator_seed", pa.int64()), ("eval_seed", pa.int64()), ("gfd_low", pa.float64()), ("gfd_high", pa.float64()),
    ("gfd_inf", pa.float64()), ("gfd_inf_stderr", pa.float64()), ("kid", pa.float64()), ("kid_stderr", pa.float64()),
]
REPLICATE_SCHEMA = pa.schema(list(SCHEMA) + [pa.field(n, t) for n, t in REPLICATE_FIELDS])
EVAL_SD_INTERNAL = 0.01  # the evaluation's own relative sd (its bootstrap interval is +-1.96 of it)


def law(c, alpha, lam, l_min):
    return l_min + np.exp(lam + alpha * np.log(np.asarray(c, dtype=np.float64)))


def _grid_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.kron(tiles, np.ones((16, 16, 1), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _samples_npz(path: Path, seed: int, classes: int = 10, per_class: int = 6) -> None:
    """A tiny samples file as `generator sample` writes it: uint8 NHWC images, labels grouped by class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    images = np.stack([np.full((8, 8, 1), 20 + 23 * y, np.uint8) + rng.integers(0, 20, (8, 8, 1), dtype=np.uint8)
                       for y in labels])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)


def make_rows(*, noise: float = 0.0, seed: int = 0, tokenizers=None, sizes=None, steps=None, tokenizer_seeds=None,
              generator_seeds=None, eval_seeds=None, sd_tokenizer: float = 0.0, sd_shared: float = 0.0,
              sd_generator: float = 0.0, sd_eval: float = 0.0, unbiased: bool = False) -> list[dict]:
    replicates = any(x is not None for x in (tokenizer_seeds, generator_seeds, eval_seeds))
    rows = make_one_seed_rows(noise=noise, seed=seed, tokenizers=tokenizers, sizes=sizes, steps=steps)
    if not replicates:
        return rows
    rng = np.random.default_rng([seed, 1])
    toks, gens, evals = list(tokenizer_seeds or [0]), list(generator_seeds or [0]), list(eval_seeds or [0])
    factor = {t["tokenizer_id"]: t.get("factor", 1.0) for t in tokenizers or TOKENIZERS}
    tok_eff = {(r["tokenizer_id"], i): rng.normal(0, sd_tokenizer) for r in rows for i in toks}
    shared = {(r["generator_size"], r["train_steps"], j): rng.normal(0, sd_shared) for r in rows for j in gens}
    out = []
    for base in rows:
        cell = base["run_id"]
        for i in toks:
            for j in gens:
                run_eff = tok_eff[(base["tokenizer_id"], i)] + shared[(base["generator_size"], base["train_steps"], j)] \
                    + rng.normal(0, sd_generator)
                run_id = hashlib.sha256(f"{cell}/{i}/{j}".encode()).hexdigest()[:12]
                tid = base["tokenizer_id"] if i == toks[0] else f"{base['tokenizer_id']}-s{i}"
                loss = base["val_loss"] * factor[base["tokenizer_id"]] * np.exp(run_eff)
                for k in evals:
                    gfd = base["gfd"] * factor[base["tokenizer_id"]] * np.exp(run_eff + rng.normal(0, sd_eval))
                    half = 1.959963984540054 * EVAL_SD_INTERNAL * gfd
                    suffix = "" if k == evals[0] else f"_s{k}"
                    r = {**base, "run_id": run_id, "tokenizer_id": tid, "tokenizer_cell": base["tokenizer_id"],
                         "generator_cell": cell, "tokenizer_seed": i, "generator_seed": j, "eval_seed": k,
                         "val_loss": float(loss), "gfd": float(gfd), "gfd_low": float(gfd - half),
                         "gfd_high": float(gfd + half), "tokenizer_run": f"tokenizers/{tid}",
                         "generator_run": f"generators/{run_id}", "samples_npz": f"samples/{run_id}{suffix}.npz",
                         "grid_png": f"samples/{run_id}{suffix}.png"}
                    if base["val_loss_per_position"] is not None:
                        r["val_loss_per_position"] = [v * float(loss) / base["val_loss"] for v in base["val_loss_per_position"]]
                    if unbiased:
                        r.update({"gfd_inf": float(0.9 * gfd), "gfd_inf_stderr": float(0.02 * gfd),
                                  "kid": float(gfd / 1000), "kid_stderr": float(gfd / 20000)})
                    out.append(r)
    return out


def make_one_seed_rows(*, noise: float = 0.0, seed: int = 0, tokenizers=None, sizes=None, steps=None) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    gen_protocol = {"num_samples": 2000, "label_sampling": "balanced", "feature_network": "EffNetLite0",
                    "feature_checksum": "sha256:0123abcd", "reference": "fashion-mnist:test@32px (10000 images)",
                    "precision": "fp32", "seed": 0}
    recon_protocol = {"num_samples": 10000, "feature_network": "EffNetLite0", "feature_checksum": "sha256:0123abcd",
                      "reference": "fashion-mnist:test@32px (10000 images)"}
    for tok in tokenizers or TOKENIZERS:
        for size, params in (sizes or SIZES).items():
            for n in steps or STEPS:
                tokens_seen = n * BATCH * tok["tokens_per_image"]
                fpt = 6.0 * params
                compute = fpt * tokens_seen
                loss = float(law(compute, *tok["loss"]) * np.exp(noise * rng.normal()))
                gfd = float(law(compute, *tok["gfd"]) * np.exp(noise * rng.normal()))
                run_id = hashlib.sha256(f"{tok['tokenizer_id']}/{size}/{n}".encode()).hexdigest()[:12]
                ar = tok["generator_kind"] == "ar"
                sampler = {"sampler": "ar-kv-cache", "steps": tok["tokens_per_image"], "cfg_scale": 1.5} if ar else \
                    {"sampler": "flow-euler", "steps": 50, "cfg_scale": 2.0}
                per_pos = None
                if ar:
                    shape = 1.0 + 0.6 * np.exp(-np.arange(tok["tokens_per_image"]) / 4.0)
                    per_pos = (loss * shape / shape.mean()).tolist()
                rows.append({
                    "study": "synthetic", "run_id": run_id, "tokenizer_id": tok["tokenizer_id"],
                    "tokenizer_label": tok["tokenizer_label"], "generator_label": f"{tok['generator_kind']} {size} {n} steps",
                    **{k: tok[k] for k in ("tokenizer_kind", "downsample", "tokens_per_image", "codebook_size",
                                           "latent_channels", "crt", "vf", "generator_kind", "rfd", "psnr", "ssim",
                                           "codebook_usage")},
                    "generator_size": size, "train_steps": n, "batch_size": BATCH, "params": params,
                    "tokens_seen": tokens_seen, "flops_per_token": fpt, "compute": compute, "val_loss": loss,
                    "val_loss_per_position": per_pos, "gfd": gfd, "gfd_name": GFD_NAME, "is_score": 5.0,
                    "precision": 0.6, "recall": 0.5, "gen_protocol": json.dumps({**gen_protocol, **sampler}),
                    "recon_protocol": json.dumps(recon_protocol), "tokenizer_run": f"tokenizers/{tok['tokenizer_id']}",
                    "generator_run": f"generators/{run_id}", "samples_npz": f"samples/{run_id}.npz",
                    "grid_png": f"samples/{run_id}.png", "wall_s_tokenizer": 100.0, "wall_s_generator": n / 10.0,
                    "device": "cpu:synthetic",
                })
    return rows


def write_results(directory: Path, rows: list[dict] | None = None, *, grids: bool = True, **kw) -> Path:
    """Write DIR/results.parquet (and grid PNGs) and return DIR."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = make_rows(**kw) if rows is None else rows
    replicates = any("tokenizer_cell" in r for r in rows)
    if grids:
        for i, r in enumerate(rows):
            if r.get("grid_png"):
                _grid_png(directory / r["grid_png"], i)
            if replicates and r.get("samples_npz"):
                _samples_npz(directory / r["samples_npz"], i)
    table = pa.Table.from_pylist(rows, schema=REPLICATE_SCHEMA if replicates else SCHEMA)
    pq.write_table(table, directory / "results.parquet")
    return directory
