"""LightningDiT runs end to end: train on a latent cache, load a run, sample N images to a samples file.

    task, data = build_task(cfg, "caches/kl_train", "runs/dit_B", val_cache="caches/kl_val")
    model, info = load_run("runs/dit_B", device="cuda")
    sample_run("runs/dit_B", 50_000, "samples/dit_B.npz", cfg_scale=1.5)

The kind's entry points named in twostage/registry.py, with the same signatures as the AR kind's. Run
folder and samples file as for every generator (twostage/generators/runs.py, outputs.py); model.json
also records the cache's per-channel latent statistics, which sampling de-normalizes with. Each
sample's starting noise is drawn from its own seed (seed, index), so a sample does not depend on the
batch size or on which process drew it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from twostage.common.device import resolve_device
from twostage.common.images import to_uint8
from twostage.config import ConfigError
from twostage.generators import runs
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.model import LightningDiT
from twostage.generators.dit.sampler import SAMPLERS, evaluations
from twostage.generators.dit.task import ARCH_KEYS, MODULE, REPA, DiTTask, LatentSpace, build_model, generate_latents
from twostage.generators.guidance import resolve_scale
from twostage.generators.outputs import load_decoder, sample_labels, sampling_progress, save_samples

log = logging.getLogger(__name__)

KIND = "dit"
TIME_CONVENTION = "t=0 noise, t=1 data; x_t = t x1 + (1 - t) eps; v = x1 - eps"


def build_task(cfg: DiTRunConfig, cache: str | Path, out: str | Path, *,
              val_cache: str | Path | None = None):
    """(the Task, training data) of a LightningDiT on a latent cache for run
    folder `out` (checked against what `out` already holds; nothing written). twostage/generators/training.py trains it, alone or as one of K replicas."""
    from twostage.data.token_cache import CacheDataset
    from twostage.engine.trainer import seed_everything

    cache, out = Path(cache), Path(out)
    data = CacheDataset(cache, seed=cfg.train.seed)
    space = LatentSpace.from_cache_meta(data.meta, cache)
    val = None
    if val_cache is not None:
        val = CacheDataset(Path(val_cache), random_variant=False)
        LatentSpace.from_cache_meta(val.meta, val_cache)
        runs.check_val_cache(data.meta, val.meta, val_cache, ("channels", "grid", "num_classes", "tokenizer_checksum"))
    seed_everything(cfg.train.seed)  # module init depends on it
    task = DiTTask(cfg, space, val_dataset=val)
    info = runs.model_record(KIND, task.model, data.meta, batch_size=cfg.train.batch_size, train_cache=cache,
                             val_cache=val_cache, train_samples=len(data), train_labels=data.labels)
    info.update({"latent_mean": space.latent_mean, "latent_std": space.latent_std,
                 "time_convention": TIME_CONVENTION})
    if task.train_flops_per_token != info["train_flops_per_token"]:  # REPA's projector trains too
        info.update({"train_flops_per_token": task.train_flops_per_token, "train_flops_per_step": task.flops_per_step,
                     "repa_projector_parameters": sum(p.numel() for p in task.modules[REPA].parameters())})
    runs.check_resume(out, info, ARCH_KEYS, cache)  # another tokenizer's cache: refused, nothing written
    task.record = info  # model.json: written by the task once the engine has accepted the run
    log.info("LightningDiT-%s/%d: %.1fM parameters, %.3g training FLOPs per step", cfg.model.size,
             cfg.model.patch_size, info["parameters"] / 1e6, info["train_flops_per_step"])
    return task, data


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu", weights: str = "auto",
             step: int | None = None) -> tuple[LightningDiT, dict[str, Any]]:
    """The run's model (eval mode, fp32) and its model.json record plus "config", "weights" (ema |
    raw), "step" and "checksum" (twostage/generators/runs.py: load_generator_run).

    weights: "ema" (fail if absent), "raw", or "auto" (EMA when the checkpoint has it).
    """
    def build(cfg: DiTRunConfig, info: dict[str, Any]) -> LightningDiT:
        return build_model(cfg, LatentSpace.from_model_json(info))

    return runs.load_generator_run(run_dir, KIND, DiTRunConfig, MODULE, build, device=device, weights=weights,
                                   step=step)


def sample_noise(indices: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise (len(indices), *shape) float32 on the CPU; sample i always gets the same draw for a seed."""
    g = torch.Generator()
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        g.manual_seed(seed * 1_000_003 + i)
        out[j] = torch.randn(shape, generator=g)
    return out


def sample_run(run_dir: str | Path, num: int, out: str | Path, *, cfg_scale: float | None = None, seed: int = 0,
               batch_size: int = 64, weights: str = "auto", step: int | None = None,
               tokenizer: str | Path | None = None, device: str | torch.device = "auto", precision: str = "bf16",
               compile: bool = False, grid: int = 64, steps: int | None = None, sampler: str | None = None,
               shift: float | None = None, cfg_interval: Sequence[float] | None = None,
               labels: str = "balanced") -> Path:
    """Sample `num` images and write OUT.npz / .json / .png; returns the .npz path.

    labels: "balanced" (equal counts per class) or "train" (the training cache's class proportions,
    from model.json), grouped by class either way (twostage/generators/outputs.py: sample_labels).

    Settings left None come from the run's `sample:` config; cfg_scale follows the one guidance rule
    (twostage/generators/guidance.py: 1 = none, 0 = unconditional). cfg_interval (start, end): guide
    only for t in [start, end] (t = 1 is data). precision bf16 runs the network under bf16 autocast
    (CUDA only; fp32 elsewhere); the ODE state stays float32. `tokenizer` replaces the run that made
    the training cache for decoding. A progress bar with images/s goes to stderr when it is a terminal.
    Under torchrun (WORLD_SIZE > 1) the ranks share the batches and rank 0 alone writes the file, the
    same file as one process with the same seed and batch size (twostage/engine/distributed.py).
    """
    from twostage.engine.distributed import barrier, deal_batches, init_world

    runs.check_sample_counts(num, batch_size)
    world = init_world()  # before the device: under NCCL it picks this rank's GPU
    dev = resolve_device(device)
    model, info = load_run(run_dir, device=dev, weights=weights, step=step)
    labels, label_protocol = sample_labels(num, model.num_classes, labels, info, run_dir)  # before any decoder
    cfg: DiTRunConfig = info["config"]
    s = cfg.sample
    settings = {
        "cfg_scale": resolve_scale(cfg_scale, s.cfg_scale),
        "steps": s.steps if steps is None else int(steps),
        "sampler": s.sampler if sampler is None else sampler,
        "shift": s.shift if shift is None else float(shift),
        "cfg_interval": (s.cfg_interval_start, s.cfg_interval_end) if cfg_interval is None else
        tuple(float(v) for v in cfg_interval),
    }
    if settings["sampler"] not in SAMPLERS or settings["steps"] < 1 or settings["shift"] <= 0:
        raise ConfigError(f"sampler={settings['sampler']!r}, steps={settings['steps']}, shift={settings['shift']}: "
                          f"need a sampler of {list(SAMPLERS)}, steps >= 1 and shift > 0")
    use_bf16 = runs.sampling_precision(precision, dev)
    tok = load_decoder(tokenizer or info["tokenizer_run"], dev, info.get("tokenizer_checksum", ""))
    mean, std = LatentSpace.from_model_json(info).stats(dev, cfg.flow.normalize_latents)  # the run's statistics
    net = torch.compile(model, dynamic=False) if compile else model
    batch = min(batch_size, num)
    start = time.perf_counter()
    chunks = []

    # Under torchrun the batches are dealt round robin to the ranks and rank 0 collects them in order;
    # the noise is per sample and the labels fixed, so the file is the one a single process writes.
    def work(b: int) -> np.ndarray:
        idx = range(b * batch, min(num, (b + 1) * batch))
        noise = sample_noise(idx, (model.in_channels, *model.grid), seed).to(dev)
        y = torch.from_numpy(labels[idx.start : idx.stop]).to(dev)
        z = generate_latents(net, y, noise=noise, steps=settings["steps"], sampler=settings["sampler"],
                             shift=settings["shift"], cfg_scale=settings["cfg_scale"],
                             interval=settings["cfg_interval"], precision="bf16" if use_bf16 else "fp32",
                             null_label=model.null_label)
        return to_uint8(tok.decode(z * std + mean))

    with sampling_progress(num, f"sampling {KIND}") if world.is_main else contextlib.nullcontext() as bar:
        def consume(b: int, images: np.ndarray) -> None:
            chunks.append(images)
            bar.update(len(images))

        deal_batches(-(-num // batch), world, work, consume)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if not world.is_main:  # only rank 0 writes (and logs)
        barrier(world)
        return Path(out).with_suffix(".npz")
    elapsed = time.perf_counter() - start
    images = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
    protocol = {
        "num_samples": num, **label_protocol, "sampler": f"flow-{settings['sampler']}",
        "steps": settings["steps"], "nfe": evaluations(settings["steps"], settings["sampler"]),
        # the grid's shift: the sampling setting times the dimension-dependent shift the run trained with
        "timestep_shift": settings["shift"] * model.time_shift, "sample_shift": settings["shift"],
        "dimension_shift": model.time_shift, "cfg_scale": settings["cfg_scale"],
        "cfg_interval": list(settings["cfg_interval"]), "cfg_channels": "all",
        "time_convention": "t=0 noise, t=1 data", "seed": seed, "batch_size": batch,
        "precision": "bf16" if use_bf16 else "fp32", "weights": info["weights"], "step": info["step"],
    }
    extra = {"run": str(Path(run_dir).resolve()), "tokenizer_run": str(tokenizer or info.get("tokenizer_run")),
             "seconds": elapsed, "images_per_s": num / max(elapsed, 1e-9), "device": str(dev)}
    if world.distributed:
        extra["processes"] = world.size
    log.info("sampled %d images in %.1f s (%.1f images/s)", num, elapsed, extra["images_per_s"])
    path = save_samples(Path(out), images, labels, protocol, extra=extra, grid=grid)
    barrier(world)  # the other ranks return once the file is there
    return path


__all__ = ["KIND", "build_task", "load_run", "sample_run", "sample_noise"]
