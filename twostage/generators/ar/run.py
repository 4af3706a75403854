"""AR runs end to end: train on a token cache, load a run, sample N images to a samples file.

    task, data = build_task(cfg, "caches/f8_train", "runs/ar_B", val_cache="caches/f8_val")
    model, info = load_run("runs/ar_B", device="cuda")
    sample_run("runs/ar_B", num=50_000, out="samples/ar_B_cfg2.npz", cfg_scale=2.0)

The kind's entry points named in twostage/registry.py, with the same signatures as the DiT kind's.
Run folder and samples file as for every generator (twostage/generators/runs.py, outputs.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twostage.common.device import resolve_device
from twostage.common.images import to_uint8
from twostage.data.token_cache import CacheDataset
from twostage.generators import runs
from twostage.generators.ar.config import ARRunConfig
from twostage.generators.ar.model import ARTransformer
from twostage.generators.ar.sampler import ARSampler
from twostage.generators.ar.task import ARCH_KEYS, MODULE, ARTask, check_token_cache
from twostage.generators.guidance import resolve_scale
from twostage.generators.outputs import load_decoder, sample_labels, sampling_progress, save_samples

log = logging.getLogger(__name__)

KIND = "ar"


def build_task(cfg: ARRunConfig, cache: str | Path, out: str | Path, *,
              val_cache: str | Path | None = None):
    """(the Task, training data) of an AR generator on a token cache for run
    folder `out` (checked against what `out` already holds; nothing written). twostage/generators/training.py trains it, alone or as one of K replicas."""
    from twostage.engine.trainer import seed_everything

    cache, out = Path(cache), Path(out)
    data = CacheDataset(cache, seed=cfg.train.seed)
    check_token_cache(data.meta, cache)
    val = None
    if val_cache is not None:
        val = CacheDataset(Path(val_cache), random_variant=False)
        check_token_cache(val.meta, Path(val_cache))
        runs.check_val_cache(data.meta, val.meta, val_cache, ("grid", "codebook_size", "num_classes",
                                                             "tokenizer_checksum"))
    seed_everything(cfg.train.seed)  # module init depends on it
    task = ARTask(cfg, data.meta, val_data=val)
    info = runs.model_record(KIND, task.model, data.meta, batch_size=cfg.train.batch_size, train_cache=cache,
                             val_cache=val_cache, train_samples=len(data), train_labels=data.labels)
    runs.check_resume(out, info, ARCH_KEYS, cache)  # another tokenizer's cache: refused, nothing written
    task.record = info  # model.json: written by the task once the engine has accepted the run
    log.info("AR %s: %.1fM parameters (%.1fM non-embedding), %.3g training FLOPs per step", cfg.model.size,
             info["parameters"] / 1e6, info["non_embedding_parameters"] / 1e6, info["train_flops_per_step"])
    return task, data


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu", weights: str = "auto",
             step: int | None = None) -> tuple[ARTransformer, dict[str, Any]]:
    """The run's model (eval mode, fp32) and its model.json record plus "config", "weights" (ema |
    raw), "step" and "checksum" (twostage/generators/runs.py: load_generator_run).

    weights: "ema" (fail if absent), "raw", or "auto" (EMA when the checkpoint has it).
    """
    def build(cfg: ARRunConfig, info: dict[str, Any]) -> ARTransformer:
        return ARTransformer(cfg.model, info["vocab_size"], info["num_classes"], tuple(info["grid"]))

    return runs.load_generator_run(run_dir, KIND, ARRunConfig, MODULE, build, device=device, weights=weights,
                                   step=step)


def sample_run(run_dir: str | Path, num: int, out: str | Path, *, cfg_scale: float | None = None, seed: int = 0,
               batch_size: int = 64, weights: str = "auto", step: int | None = None,
               tokenizer: str | Path | None = None, device: str | torch.device = "auto", precision: str = "bf16",
               compile: bool = False, grid: int = 64, cfg_until: int | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               tokens_only: bool | None = None, labels: str = "balanced") -> Path:
    """Sample `num` images and write OUT.npz / .json / .png; returns the .npz path.

    labels: "balanced" (equal counts per class) or "train" (the training cache's class proportions,
    from model.json), grouped by class either way (twostage/generators/outputs.py: sample_labels).

    Settings left None come from the run's `sample:` config; cfg_scale follows the one guidance rule
    (twostage/generators/guidance.py: 1 = none, 0 = unconditional). precision bf16 casts the weights
    and the KV cache to bf16 (CUDA only; fp32 elsewhere). `tokenizer` replaces the run that made the
    training cache for decoding; with tokens_only no images are decoded (the npz then holds tokens and
    labels only). A progress bar with images/s goes to stderr when it is a terminal.
    Under torchrun (WORLD_SIZE > 1) the ranks share the batches and rank 0 alone writes the file, the
    same file as one process with the same seed and batch size (twostage/engine/distributed.py).
    """
    from twostage.engine.distributed import barrier, deal_batches, init_world

    runs.check_sample_counts(num, batch_size)
    world = init_world()  # before the device: under NCCL it picks this rank's GPU
    dev = resolve_device(device)
    model, info = load_run(run_dir, device=dev, weights=weights, step=step)
    labels, label_protocol = sample_labels(num, model.num_classes, labels, info, run_dir)  # before any decoder
    s = info["config"].sample
    settings = {
        "cfg_scale": resolve_scale(cfg_scale, s.cfg_scale),
        "cfg_until": s.cfg_until if cfg_until is None else int(cfg_until),
        "temperature": s.temperature if temperature is None else float(temperature),
        "top_k": s.top_k if top_k is None else int(top_k),
        "top_p": s.top_p if top_p is None else float(top_p),
    }
    use_bf16 = runs.sampling_precision(precision, dev)
    if use_bf16:
        model = model.to(torch.bfloat16)
    tok = None if tokens_only else load_decoder(tokenizer or info["tokenizer_run"], dev,
                                                info.get("tokenizer_checksum", ""))
    sampler = ARSampler(model, batch_size=min(batch_size, num), compile=compile, **settings)
    start = time.perf_counter()
    token_chunks, image_chunks = [], []

    # Sample and decode batch by batch (batch b draws its noise from (seed, b): the same tokens as one
    # call over all labels), so 50k images never sit on the GPU at once and the bar moves per batch.
    # Under torchrun the global batches are dealt round robin to the ranks and rank 0 collects them in
    # order: the same samples as one process with the same seed and batch size.
    def work(b: int):
        part = labels[b * sampler.batch : (b + 1) * sampler.batch]
        tokens = sampler.sample(torch.from_numpy(part), seed=seed, first_batch=b)
        return tokens.cpu().numpy(), (None if tok is None else to_uint8(tok.decode(tokens)))

    with sampling_progress(num, f"sampling {KIND}") if world.is_main else contextlib.nullcontext() as bar:
        def consume(b: int, result) -> None:
            token_chunks.append(result[0])
            if result[1] is not None:
                image_chunks.append(result[1])
            bar.update(len(result[0]))

        deal_batches(-(-num // sampler.batch), world, work, consume)
    sampler.release()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if not world.is_main:  # only rank 0 writes (and logs)
        barrier(world)
        return Path(out).with_suffix(".npz")
    elapsed = time.perf_counter() - start
    tokens = np.concatenate(token_chunks) if token_chunks else np.zeros((0, *model.grid), np.int64)
    images = np.concatenate(image_chunks) if image_chunks else np.zeros((0, 0, 0, 3), np.uint8)
    protocol = {
        "num_samples": num, **label_protocol, "sampler": "ar-kv-cache",
        "steps": model.num_tokens, "cfg_scale": settings["cfg_scale"],
        "cfg_interval": None if settings["cfg_until"] is None else [0, settings["cfg_until"]],
        "temperature": settings["temperature"], "top_k": settings["top_k"] or "all", "top_p": settings["top_p"],
        "seed": seed, "batch_size": sampler.batch, "precision": "bf16" if use_bf16 else "fp32",
        "weights": info["weights"], "step": info["step"],
    }
    extra = {"run": str(Path(run_dir).resolve()), "tokenizer_run": str(tokenizer or info.get("tokenizer_run")),
             "seconds": elapsed, "images_per_s": num / max(elapsed, 1e-9), "device": str(dev)}
    if world.distributed:
        extra["processes"] = world.size
    log.info("sampled %d images in %.1f s (%.1f images/s)", num, elapsed, extra["images_per_s"])
    path = save_samples(Path(out), images, labels, protocol, tokens=tokens, extra=extra,
                        grid=grid if tok is not None else 0)
    barrier(world)  # the other ranks return once the file is there
    return path


__all__ = ["KIND", "build_task", "load_run", "sample_run"]
