"""`ARTask`: the AR generator as a Task for the shared training engine, and `train_ar`.

    train_ar(cfg, tokens=Path("caches/f8_train"), out=Path("runs/ar"), val_tokens=Path("caches/f8_val"))

One phase, one optimizer. The loss is the mean next-token cross-entropy over all positions, with the
class replaced by the null class with probability `label_dropout` (for classifier-free guidance).
At each checkpoint: validation cross-entropy overall (logged as val/loss) and per token position
(run_dir/val/step_XXXXXXX.json; the compression-generation study needs both), the training compute
so far, and a grid of samples when the cache's tokenizer run can be loaded.

run_dir/model.json records the architecture, the cache it trained on, parameter counts (total and
non-embedding) and training FLOPs per token and per step (formula in ARTransformer.flops_per_token).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from twostage.config import ConfigError
from twostage.data.token_cache import CacheDataset, CacheMeta
from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase
from twostage.generators.ar.model import ARTransformer, describe
from twostage.generators.ar.config import ARRunConfig

log = logging.getLogger(__name__)

MODULE = "gpt"  # key prefix of the model's weights in checkpoints


def check_token_cache(meta: CacheMeta, where: Path) -> None:
    if meta.kind != "tokens":
        raise ConfigError(f"{where} holds continuous latents; the AR generator trains on a discrete token cache")
    if not meta.codebook_size or meta.num_classes <= 0:
        raise ConfigError(f"{where}/meta.json lacks codebook_size or num_classes; re-encode the cache")


class ARTask(TaskBase):
    def __init__(self, cfg: ARRunConfig, meta: CacheMeta, *, val_data: CacheDataset | None = None):
        self.cfg, self.meta, self.val_data = cfg, meta, val_data
        self.model = ARTransformer(cfg.model, meta.codebook_size, meta.num_classes, meta.grid)
        self.modules: dict[str, nn.Module] = {MODULE: self.model}
        self.flops_per_step = self.model.flops_per_token()["train"] * self.model.num_tokens * cfg.train.batch_size
        self._tokenizer: Any = None  # loaded on the first checkpoint that draws samples; False = unavailable

    def optimizers(self) -> dict[str, OptimSpec]:
        return {MODULE: OptimSpec([MODULE], self.cfg.optim)}

    def phases(self) -> list[Phase]:
        return [Phase("ar", [MODULE], self.loss)]

    def ema_modules(self) -> list[str]:
        return [MODULE]  # used only when train.ema_decay is set

    def loss(self, ctx: PhaseContext):
        tokens, labels = ctx.batch
        p = self.cfg.label_dropout
        if p > 0:  # classifier-free guidance: learn the unconditional model on the null class
            drop = torch.rand(labels.shape, device=labels.device) < p
            labels = torch.where(drop, torch.full_like(labels, self.model.null_class), labels)
        ce = ctx.models[MODULE](tokens, labels, per_token_loss=True)
        return ce.mean(), {}

    # -- checkpoints ----------------------------------------------------------------------------------

    def on_checkpoint(self, step: int, run_dir: Any, models: Mapping[str, nn.Module]) -> dict[str, float]:
        run_dir = Path(run_dir)
        model = models[MODULE]
        weights = "ema" if self.cfg.train.ema_decay else "raw"
        logs: dict[str, float] = {"compute/train_flops": step * self.flops_per_step,
                                  "compute/tokens_seen": float(step * self.cfg.train.batch_size * self.model.num_tokens)}
        if self.val_data is not None:
            result = validation_loss(model, self.val_data, self.cfg.val.batch_size, self.cfg.val.max_samples,
                                     bf16=self._bf16(model))
            folder = run_dir / "val"
            folder.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "weights": weights, **result, "train_flops": logs["compute/train_flops"],
                      "tokens_seen": logs["compute/tokens_seen"]}
            (folder / f"step_{step:07d}.json").write_text(json.dumps(record))
            logs["val/loss"] = result["loss"]
        if self.cfg.sample.grid_at_checkpoint > 0:
            self._sample_grid(model, step, run_dir)
        return logs

    def _bf16(self, model: nn.Module) -> bool:
        device = next(model.parameters()).device
        return device.type == "cuda" and self.cfg.train.precision != "fp32"

    def _sample_grid(self, model: nn.Module, step: int, run_dir: Path) -> None:
        from twostage.generators.ar.sampler import ARSampler
        from twostage.generators.outputs import load_tokenizer, save_image_grid
        from twostage.generators.ar.filters import balanced_labels

        device = next(model.parameters()).device
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self.meta.tokenizer_run, device)
            except Exception as err:  # a missing tokenizer must not stop training
                log.warning("no sample grids: cannot load the tokenizer run %r (%s)", self.meta.tokenizer_run, err)
                self._tokenizer = False
        if self._tokenizer is False:
            return
        raw = getattr(model, "_orig_mod", model)
        was_training = raw.training  # the sampler switches the model to eval mode
        s = self.cfg.sample
        n = self.cfg.sample.grid_at_checkpoint
        sampler = ARSampler(raw, batch_size=n, cfg_scale=s.cfg_scale, cfg_until=s.cfg_until,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cuda_graphs=False)
        labels = torch.as_tensor(balanced_labels(n, self.model.num_classes))
        autocast = torch.autocast("cuda", torch.bfloat16) if self._bf16(raw) else contextlib.nullcontext()
        with autocast:
            tokens = sampler.sample(labels, seed=step)
        raw.train(was_training)
        images = self._tokenizer.decode_indices(tokens)
        save_image_grid(images, run_dir / "samples" / f"step_{step:07d}.png")


@torch.no_grad()
def validation_loss(model: nn.Module, data: CacheDataset, batch_size: int = 64, max_samples: int | None = None,
                    bf16: bool = False) -> dict[str, Any]:
    """Mean cross-entropy (nats/token) overall and per token position on the plain variant of every
    sample (labels kept: the conditional loss)."""
    raw = getattr(model, "_orig_mod", model)
    forward = raw.forward  # eager: no recompilation of a compiled training graph for eval shapes
    device = next(raw.parameters()).device
    was_training = raw.training
    raw.eval()
    n = len(data) if max_samples is None else min(len(data), max_samples)
    total = torch.zeros(raw.num_tokens, dtype=torch.float64, device=device)
    autocast = torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext()
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        # variant 0 = the plain (unflipped) images; one memory-mapped slice per batch
        tokens = torch.from_numpy(np.asarray(data.data[start:stop, 0]).astype(np.int64)).to(device)
        labels = torch.from_numpy(np.asarray(data.labels[start:stop]).astype(np.int64)).to(device)
        with autocast:
            ce = forward(tokens, labels, per_token_loss=True)
        total += ce.double().sum(0)
    raw.train(was_training)
    per_pos = (total / max(n, 1)).tolist()
    return {"loss": sum(per_pos) / len(per_pos), "per_position": per_pos, "num_samples": n}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_model_json(out: Path, info: dict) -> None:
    """Record the model; refuse to mix two architectures in one run folder."""
    path = out / "model.json"
    if path.is_file():
        old = json.loads(path.read_text())
        keys = ("layers", "width", "heads", "vocab_size", "num_classes", "grid")
        changed = [k for k in keys if old.get(k) != info.get(k)]
        if changed:
            raise ConfigError(f"{out} holds a run of another model ({', '.join(f'{k}: {old.get(k)} -> {info.get(k)}' for k in changed)}); "
                              "train into a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".model.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def train_ar(cfg: ARRunConfig, tokens: Path, out: Path, val_tokens: Path | None = None) -> dict[str, float]:
    """Train (or resume) an AR generator on a token cache into `out`; returns the last logs."""
    from twostage.engine.trainer import seed_everything, train

    data = CacheDataset(Path(tokens), seed=cfg.train.seed)
    meta = data.meta
    check_token_cache(meta, Path(tokens))
    val = None
    if val_tokens is not None:
        val = CacheDataset(Path(val_tokens), random_variant=False)
        check_token_cache(val.meta, Path(val_tokens))
        for key in ("grid", "codebook_size", "num_classes", "tokenizer_checksum"):
            if getattr(val.meta, key) != getattr(meta, key):
                raise ConfigError(f"the validation cache {val_tokens} has {key}={getattr(val.meta, key)!r} but the "
                                  f"training cache has {getattr(meta, key)!r}; encode both with the same tokenizer")
    seed_everything(cfg.train.seed)  # module init depends on it
    task = ARTask(cfg, meta, val_data=val)
    if _is_main_process():
        info = describe(task.model, tokens_per_step=task.model.num_tokens * cfg.train.batch_size)
        info.update({
            "train_tokens": str(Path(tokens).resolve()), "val_tokens": str(Path(val_tokens).resolve()) if val_tokens else None,
            "train_samples": len(data), "tokenizer_run": meta.tokenizer_run,
            "tokenizer_checksum": meta.tokenizer_checksum, "image_size": meta.image_size,
        })
        write_model_json(Path(out), info)
    log.info("AR %s: %.1fM parameters (%.1fM non-embedding), %.3g training FLOPs per step",
             cfg.model.size, task.model.param_counts()["total"] / 1e6,
             task.model.param_counts()["non_embedding"] / 1e6, task.flops_per_step)
    return train(task, cfg.train, data, Path(out), full_config=cfg)
