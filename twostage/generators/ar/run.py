"""A trained AR run as a sampler: load its weights, draw N images, write the samples file.

    model, info = load_ar_run("runs/ar_B", device="cuda")
    sample_ar_run("runs/ar_B", num=50_000, out="samples/ar_B_cfg2.npz", cfg_scale=2.0)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twostage import config as configlib
from twostage.engine import checkpoint as ckpt
from twostage.generators.ar.model import ARTransformer
from twostage.generators.ar.sampler import ARSampler
from twostage.generators.ar.task import MODULE
from twostage.generators.ar.config import ARRunConfig
from twostage.generators.outputs import RunLoadError, load_tokenizer, save_samples, to_uint8
from twostage.generators.ar.filters import balanced_labels

log = logging.getLogger(__name__)


def load_ar_run(run_dir: str | Path, *, device: str | torch.device = "cpu", weights: str = "auto",
                step: int | None = None) -> tuple[ARTransformer, dict[str, Any]]:
    """The run's model (eval mode, fp32) and its model.json record (+ "weights", "step", "config").

    weights: "ema" (fail if absent), "raw", or "auto" (EMA when the checkpoint has it).
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.json"):
        if not (run_dir / name).is_file():
            raise RunLoadError(f"{run_dir} is not an AR generator run (no {name}); train one with "
                               "`twostage generator train CONFIG --tokens CACHE --out RUN`")
    cfg = configlib.load(ARRunConfig, run_dir / "config.yaml")
    info = json.loads((run_dir / "model.json").read_text())
    folder = run_dir / "checkpoints"
    path = folder / f"step_{step:07d}" if step is not None else ckpt.latest_checkpoint(folder)
    if path is None or not (path / "model.safetensors").is_file():
        raise RunLoadError(f"{run_dir} has no checkpoint{'' if step is None else f' at step {step}'}")
    from safetensors.torch import load_file

    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw; got {weights!r}")
    file = path / "ema.safetensors"
    if weights == "ema" and not file.is_file():
        raise RunLoadError(f"{path} has no EMA weights (the run trained without train.ema_decay); use --weights raw")
    if weights == "raw" or not file.is_file():
        file = path / "model.safetensors"
    prefix = f"{MODULE}."
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in load_file(str(file)).items() if k.startswith(prefix)}
    model = ARTransformer(cfg.model, info["vocab_size"], info["num_classes"], tuple(info["grid"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RunLoadError(f"{file} does not match the model in {run_dir}/config.yaml: {err}") from None
    info = {**info, "weights": file.stem, "step": int(ckpt.STEP_DIR.match(path.name).group(1)), "config": cfg}
    return model.to(device).eval(), info


def sample_ar_run(run_dir: str | Path, num: int, out: str | Path, *, cfg_scale: float | None = None,
                  cfg_until: int | None = None, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, batch_size: int = 64, weights: str = "auto",
                  step: int | None = None, tokenizer: str | Path | None = None, device: str = "auto",
                  precision: str = "bf16", compile: bool = False, grid: int = 64, decoder: Any = None,
                  tokens_only: bool = False) -> Path:
    """Sample `num` images with balanced labels and write OUT.npz / .json / .png.

    Settings left None come from the run's `sample:` config. precision bf16 casts the weights and
    the KV cache to bf16 (CUDA only; fp32 elsewhere). `decoder` replaces the tokenizer (an object
    with decode_indices(indices (N, h, w)) -> float images (N, C, H, W) in [-1, 1]); with
    tokens_only no images are decoded (the npz then holds tokens and labels only).
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model, info = load_ar_run(run_dir, device=dev, weights=weights, step=step)
    s = info["config"].sample
    settings = {
        "cfg_scale": s.cfg_scale if cfg_scale is None else cfg_scale,
        "cfg_until": s.cfg_until if cfg_until is None else cfg_until,
        "temperature": s.temperature if temperature is None else temperature,
        "top_k": s.top_k if top_k is None else top_k,
        "top_p": s.top_p if top_p is None else top_p,
    }
    use_bf16 = precision == "bf16" and dev.type == "cuda"
    if use_bf16:
        model = model.to(torch.bfloat16)
    if decoder is None and not tokens_only:
        decoder = load_tokenizer(tokenizer or info["tokenizer_run"], dev)
        checksum = getattr(decoder, "checksum", None)
        if checksum and info.get("tokenizer_checksum") and checksum != info["tokenizer_checksum"]:
            log.warning("the tokenizer's weights (sha256 %s) differ from those that made the training cache (%s)",
                        checksum[:12], info["tokenizer_checksum"][:12])
    # Scale 1 is conditional sampling: skip the doubled batch (same tokens, half the work).
    guided = {**settings, "cfg_scale": 0.0 if settings["cfg_scale"] == 1.0 else settings["cfg_scale"]}
    sampler = ARSampler(model, batch_size=min(batch_size, max(num, 1)), compile=compile, **guided)
    labels = balanced_labels(num, model.num_classes)
    start = time.perf_counter()
    token_chunks, image_chunks = [], []
    # Sample and decode chunk by chunk so 50k images never sit on the GPU at once.
    chunk = sampler.batch * max(1, 4096 // sampler.batch)
    for i in range(0, num, chunk):
        part = labels[i : i + chunk]
        tokens = sampler.sample(torch.from_numpy(part), seed=seed, first_batch=i // sampler.batch)
        token_chunks.append(tokens.cpu().numpy())
        if decoder is not None:
            for j in range(0, len(tokens), sampler.batch):
                image_chunks.append(to_uint8(decoder.decode_indices(tokens[j : j + sampler.batch])))
        log.info("sampled %d / %d", min(num, i + chunk), num)
    sampler.release()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - start
    tokens = np.concatenate(token_chunks) if token_chunks else np.zeros((0, *model.grid), np.int64)
    images = np.concatenate(image_chunks) if image_chunks else np.zeros((0, 0, 0, 3), np.uint8)
    protocol = {
        "num_samples": num, "label_sampling": "balanced", "sampler": "ar-kv-cache",
        "steps": model.num_tokens, "cfg_scale": settings["cfg_scale"],
        "cfg_interval": None if settings["cfg_until"] is None else [0, settings["cfg_until"]],
        "temperature": settings["temperature"], "top_k": settings["top_k"] or "all", "top_p": settings["top_p"],
        "seed": seed, "batch_size": sampler.batch, "precision": "bf16" if use_bf16 else "fp32",
        "weights": info["weights"], "step": info["step"],
    }
    extra = {"run": str(Path(run_dir).resolve()), "tokenizer_run": str(tokenizer or info.get("tokenizer_run")),
             "seconds": elapsed, "images_per_s": num / max(elapsed, 1e-9), "device": str(dev)}
    return save_samples(Path(out), images, labels, protocol, tokens=tokens, extra=extra,
                        grid=grid if decoder is not None else 0)
