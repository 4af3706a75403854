"""LightningDiT runs end to end: train on a latent cache, load a run, sample N images to a samples file.

    train_dit(cfg, Path("caches/kl_train"), Path("runs/dit_B"), val_cache=Path("caches/kl_val"))
    sample_dit("runs/dit_B", 50_000, "samples/dit_B.npz", cfg_scale=1.5)

Same run-folder layout and samples-file format as the AR generator (twostage/generators/outputs.py):
config.yaml (with kind: dit), model.json (architecture + the cache's latent space, including the
per-channel statistics that sampling de-normalizes with), checkpoints/; samples FILE.npz (uint8 images,
balanced labels, protocol), FILE.json and FILE.png. Each sample's starting noise is drawn from its own
seed (seed, index), so a sample does not depend on the batch size or on which process drew it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from twostage import config as configlib
from twostage.config import ConfigError
from twostage.engine import checkpoint as ckpt
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.model import LightningDiT, non_embedding_parameters
from twostage.generators.dit.task import DiTTask, LatentSpace, balanced_labels, build_model, generate_latents
from twostage.generators.dit.sampler import evaluations
from twostage.generators.outputs import RunLoadError, save_samples, to_uint8

log = logging.getLogger(__name__)

MODULE = "dit"
ARCH_KEYS = ("layers", "width", "heads", "patch_size", "channels", "grid", "num_classes")


def _device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_info(cfg: DiTRunConfig, space: LatentSpace, model: LightningDiT) -> dict[str, Any]:
    layers, width, heads = cfg.model.shape
    tokens = model.tokens_grid[0] * model.tokens_grid[1]
    n = non_embedding_parameters(model)
    # Training FLOPs per image: 6 N T + attention scores (forward + backward), as in bench_dit.py.
    flops = 6 * n * tokens + 12 * layers * tokens * tokens * width
    return {"kind": "dit", "size": cfg.model.size, "layers": layers, "width": width, "heads": heads,
            "patch_size": cfg.model.patch_size, "tokens": tokens,
            "parameters": sum(p.numel() for p in model.parameters()), "non_embedding_parameters": n,
            "train_flops_per_image": flops, "train_flops_per_step": flops * cfg.train.batch_size,
            "time_convention": "t=0 noise, t=1 data; x_t = t x1 + (1 - t) eps; v = x1 - eps",
            **{k: v for k, v in asdict(space).items()}}


def write_model_json(out: Path, info: dict) -> None:
    """Record the model; refuse to mix two architectures in one run folder."""
    path = out / "model.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in ARCH_KEYS if old.get(k) != info.get(k)]
        if changed:
            raise ConfigError(f"{out} holds a run of another model ({', '.join(f'{k}: {old.get(k)} -> {info.get(k)}' for k in changed)}); "
                              "train into a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".model.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2, default=list))
    os.replace(tmp, path)


def latent_decoder(tokenizer_run: str | Path, device: torch.device | str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """De-normalized latents -> images in [-1, 1], through the KL tokenizer of `tokenizer_run`."""
    from twostage.tokenizers.kl.tokenizer import KLTokenizer

    tok = KLTokenizer.from_pretrained(tokenizer_run, device=_device(device))

    def decode(z: torch.Tensor) -> torch.Tensor:
        return tok.decode(z.to(tok.device))

    decode.checksum = tok.checksum  # type: ignore[attr-defined]
    return decode


def train_dit(cfg: DiTRunConfig, cache: str | Path, run_dir: str | Path, *, val_cache: str | Path | None = None,
              decoder: Callable[[], Any] | None = None) -> dict[str, float]:
    """Train (or resume) a LightningDiT on a latent cache into `run_dir`; returns the last logs.

    decoder: factory of the checkpoint-grid decoder (default: the cache's KL tokenizer, if loadable).
    """
    from twostage.data.token_cache import CacheDataset
    from twostage.engine.trainer import seed_everything, train

    cache, run_dir = Path(cache), Path(run_dir)
    data = CacheDataset(cache, seed=cfg.train.seed)
    space = LatentSpace.from_cache_meta(data.meta, cache)
    val = None
    if val_cache is not None:
        val = CacheDataset(Path(val_cache), random_variant=False)
        other = LatentSpace.from_cache_meta(val.meta, val_cache)
        for key in ("channels", "grid", "num_classes", "tokenizer_checksum"):
            if getattr(other, key) != getattr(space, key):
                raise ConfigError(f"the validation cache {val_cache} differs from the training cache in {key}: "
                                  f"{getattr(other, key)} vs {getattr(space, key)}")
    seed_everything(cfg.train.seed)  # module init depends on it
    if decoder is None and space.tokenizer_run:
        decoder = lambda: latent_decoder(space.tokenizer_run, cfg.train.device)  # noqa: E731
    task = DiTTask(cfg, space, val_dataset=val, decoder=decoder)
    info = model_info(cfg, space, task.modules[MODULE])
    write_model_json(run_dir, info)
    log.info("LightningDiT-%s/%d: %.1fM parameters, %.3g training FLOPs per step", cfg.model.size,
             cfg.model.patch_size, info["parameters"] / 1e6, info["train_flops_per_step"])
    return train(task, cfg.train, data, run_dir, full_config=cfg)


def load_dit_run(run_dir: str | Path, *, device: str | torch.device = "cpu", weights: str = "auto",
                 step: int | None = None) -> tuple[LightningDiT, dict[str, Any]]:
    """The run's model (eval mode, fp32) and its model.json record (+ "weights", "step", "config", "space").

    weights: "ema" (fail if absent), "raw", or "auto" (EMA when the checkpoint has it).
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.json"):
        if not (run_dir / name).is_file():
            raise RunLoadError(f"{run_dir} is not a DiT generator run (no {name}); train one with "
                               "`twostage generator train dit_... --tokens CACHE --out RUN`")
    cfg = configlib.load(DiTRunConfig, run_dir / "config.yaml")
    info = json.loads((run_dir / "model.json").read_text())
    space = LatentSpace(**{k: info[k] for k in ("channels", "grid", "num_classes", "latent_mean", "latent_std",
                                               "image_size", "tokenizer_run", "tokenizer_checksum", "cache")})
    space.grid = tuple(space.grid)
    folder = run_dir / "checkpoints"
    path = folder / f"step_{step:07d}" if step is not None else ckpt.latest_checkpoint(folder)
    if path is None or not (path / "model.safetensors").is_file():
        raise RunLoadError(f"{run_dir} has no checkpoint{'' if step is None else f' at step {step}'}")
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw; got {weights!r}")
    file = path / "ema.safetensors"
    if weights == "ema" and not file.is_file():
        raise RunLoadError(f"{path} has no EMA weights (the run trained without train.ema_decay); use --weights raw")
    if weights == "raw" or not file.is_file():
        file = path / "model.safetensors"
    from safetensors.torch import load_file

    prefix = f"{MODULE}."
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in load_file(str(file)).items() if k.startswith(prefix)}
    model = build_model(cfg, space)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RunLoadError(f"{file} does not match the model in {run_dir}/config.yaml: {err}") from None
    info = {**info, "weights": file.stem, "step": int(ckpt.STEP_DIR.match(path.name).group(1)), "config": cfg,
            "space": space}
    return model.to(device).eval(), info


def sample_noise(indices: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise (len(indices), *shape) float32 on the CPU; sample i always gets the same draw for a seed."""
    g = torch.Generator()
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        g.manual_seed(seed * 1_000_003 + i)
        out[j] = torch.randn(shape, generator=g)
    return out


def sample_dit(run_dir: str | Path, num: int, out: str | Path, *, cfg_scale: float | None = None,
               steps: int | None = None, sampler: str | None = None, shift: float | None = None,
               cfg_interval: tuple[float, float] | None = None, seed: int = 0, batch_size: int = 64,
               weights: str = "auto", step: int | None = None, tokenizer: str | Path | None = None,
               device: str = "auto", precision: str = "bf16", compile: bool = False, grid: int = 64,
               decoder: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Sample `num` images with balanced labels and write OUT.npz / .json / .png.

    Settings left None come from the run's `sample:` config. precision bf16 runs the network under
    bf16 autocast (CUDA only; fp32 elsewhere); the ODE state stays float32. `decoder` replaces the
    tokenizer (de-normalized latents -> images in [-1, 1]).
    """
    dev = _device(device)
    model, info = load_dit_run(run_dir, device=dev, weights=weights, step=step)
    cfg: DiTRunConfig = info["config"]
    s = cfg.sample
    settings = {
        "cfg_scale": s.cfg_scale if cfg_scale is None else cfg_scale,
        "steps": s.steps if steps is None else steps,
        "sampler": s.sampler if sampler is None else sampler,
        "shift": s.shift if shift is None else shift,
        "cfg_interval": (s.cfg_interval_start, s.cfg_interval_end) if cfg_interval is None else tuple(cfg_interval),
    }
    if settings["cfg_scale"] == 0:  # the AR CLI's "0: no guidance"
        settings["cfg_scale"] = 1.0
    if decoder is None:
        decoder = latent_decoder(tokenizer or info["tokenizer_run"], dev)
        checksum = getattr(decoder, "checksum", None)
        if checksum and info.get("tokenizer_checksum") and checksum != info["tokenizer_checksum"]:
            log.warning("the tokenizer's weights (sha256 %s) differ from those that made the training cache (%s)",
                        checksum[:12], info["tokenizer_checksum"][:12])
    mean, std = info["space"].stats(dev, cfg.flow.normalize_latents)  # the run's latent statistics
    use_bf16 = precision == "bf16" and dev.type == "cuda"
    net = torch.compile(model, dynamic=False) if compile else model
    labels = balanced_labels(num, model.num_classes)
    batch = max(1, min(batch_size, num))
    start = time.perf_counter()
    chunks = []
    for i in range(0, num, batch):
        idx = range(i, min(num, i + batch))
        noise = sample_noise(idx, (model.in_channels, *model.grid), seed).to(dev)
        y = torch.from_numpy(labels[i : i + len(idx)]).to(dev)
        z = generate_latents(net, y, noise=noise, steps=settings["steps"], sampler=settings["sampler"],
                             shift=settings["shift"], cfg_scale=settings["cfg_scale"],
                             interval=settings["cfg_interval"], precision="bf16" if use_bf16 else "fp32",
                             null_label=model.null_label)
        chunks.append(to_uint8(decoder(z * std + mean)))
        if (i // batch) % 10 == 0:
            log.info("sampled %d / %d", i + len(idx), num)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - start
    images = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
    protocol = {
        "num_samples": num, "label_sampling": "balanced", "sampler": f"flow-{settings['sampler']}",
        "steps": settings["steps"], "nfe": evaluations(settings["steps"], settings["sampler"]),
        "timestep_shift": settings["shift"], "cfg_scale": settings["cfg_scale"],
        "cfg_interval": list(settings["cfg_interval"]), "cfg_channels": "all",
        "time_convention": "t=0 noise, t=1 data", "seed": seed, "batch_size": batch,
        "precision": "bf16" if use_bf16 else "fp32", "weights": info["weights"], "step": info["step"],
    }
    extra = {"run": str(Path(run_dir).resolve()), "tokenizer_run": str(tokenizer or info.get("tokenizer_run")),
             "seconds": elapsed, "images_per_s": num / max(elapsed, 1e-9), "device": str(dev)}
    return save_samples(Path(out), images, labels, protocol, extra=extra, grid=grid)


__all__ = ["train_dit", "load_dit_run", "sample_dit", "sample_noise", "latent_decoder", "model_info",
           "write_model_json"]
