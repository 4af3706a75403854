"""A synthetic study results table (the contract in twostage/study/__init__.py) with known laws.

Every run's val_loss and gFD follow its tokenizer's law L(C) = L_min + exp(lambda) * C^alpha exactly
(or times log-normal noise), so tests know the parameters a fit must recover and where the
compute-optimal tokenizer changes. Sample grids are small generated PNGs under DIR/samples/.
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


def law(c, alpha, lam, l_min):
    return l_min + np.exp(lam + alpha * np.log(np.asarray(c, dtype=np.float64)))


def _grid_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.kron(tiles, np.ones((16, 16, 1), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def make_rows(*, noise: float = 0.0, seed: int = 0, tokenizers=None, sizes=None, steps=None) -> list[dict]:
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
    if grids:
        for i, r in enumerate(rows):
            if r.get("grid_png"):
                _grid_png(directory / r["grid_png"], i)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, directory / "results.parquet")
    return directory
