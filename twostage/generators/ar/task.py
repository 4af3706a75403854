"""`ARTask`: the AR generator as a Task for the shared training engine.

One phase, one optimizer. The loss is the mean next-token cross-entropy over all positions, with the
class replaced by the null class with probability `label_dropout` (for classifier-free guidance,
arXiv 2207.12598). At each checkpoint (the engine forks the RNG around it, so the training RNG stream is
untouched): validation cross-entropy overall (logged as val/loss) and per token position
(RUN/val/step_XXXXXXX.json; the compression-generation study needs both), the training compute so
far, and a grid of samples when the cache's tokenizer run can be loaded. RUN/model.json (`record`, set
by run.py's `build_task`, which trains the task) is written at `on_start`, once the engine has accepted
the run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from twostage.config import ConfigError
from twostage.data.token_cache import CacheDataset, CacheMeta
from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase
from twostage.engine.run_files import write_val_record
from twostage.generators import runs
from twostage.generators.ar.config import ARRunConfig
from twostage.generators.ar.model import ARTransformer
from twostage.generators.outputs import Decoder, LazyDecoder, balanced_labels, save_image_grid

MODULE = "gpt"  # key prefix of the model's weights in checkpoints
ARCH_KEYS = ("layers", "width", "heads", "vocab_size", "num_classes", "grid")  # model.json: one model per folder


def check_token_cache(meta: CacheMeta, where: Path) -> None:
    if meta.kind != "tokens":
        raise ConfigError(f"{where} holds continuous latents; the AR generator trains on a discrete token cache")
    if not meta.codebook_size or meta.num_classes <= 0:
        raise ConfigError(f"{where}/meta.json lacks codebook_size or num_classes; re-encode the cache")


class ARTask(TaskBase):
    record: dict[str, Any] | None = None  # RUN/model.json (runs.model_record), written at on_start

    def __init__(self, cfg: ARRunConfig, meta: CacheMeta, *, val_data: CacheDataset | None = None,
                 decoder: Callable[[torch.device], Decoder | None] | None = None):
        """`decoder(device)` makes the checkpoint-grid decoder (token ids (N, h, w) -> images in
        [-1, 1]) at the first checkpoint; default: the cache's tokenizer."""
        self.cfg, self.meta, self.val_data = cfg, meta, val_data
        self.model = ARTransformer(cfg.model, meta.codebook_size, meta.num_classes, meta.grid)
        self.modules: dict[str, nn.Module] = {MODULE: self.model}
        self.tokens_per_step = self.model.num_tokens * cfg.train.batch_size
        self.flops_per_step = self.model.flops_per_token()["train"] * self.tokens_per_step
        self.decoder = (LazyDecoder.from_tokenizer_run(meta.tokenizer_run, meta.tokenizer_checksum)
                        if decoder is None else LazyDecoder(decoder))

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

    # -- run records ----------------------------------------------------------------------------------

    def on_start(self, run_dir: Path, resumed: bool) -> None:
        if self.record is not None:
            runs.write_model(run_dir, self.record, ARCH_KEYS)

    def on_checkpoint(self, step: int, run_dir: Any, models: Mapping[str, nn.Module]) -> dict[str, float]:
        run_dir = Path(run_dir)
        model = models[MODULE]
        device = next(model.parameters()).device
        logs = runs.compute_logs(step, self.flops_per_step, self.tokens_per_step)
        if self.val_data is not None:
            result = validation_loss(model, self.val_data, self.cfg.val.batch_size, self.cfg.val.max_samples,
                                     bf16=self._bf16(model))
            weights = "ema" if self.cfg.train.ema_decay else "raw"
            write_val_record(run_dir, step, {**result, "weights": weights,
                                             "train_flops": logs["compute/train_flops"],
                                             "tokens_seen": logs["compute/tokens_seen"]})
            logs["val/loss"] = result["loss"]
        if self.cfg.sample.grid_at_checkpoint > 0:
            self._sample_grid(model, step, run_dir, device)
        return logs

    def _bf16(self, model: nn.Module) -> bool:
        device = next(model.parameters()).device
        return device.type == "cuda" and self.cfg.train.precision != "fp32"

    def _sample_grid(self, model: nn.Module, step: int, run_dir: Path, device: torch.device) -> None:
        from twostage.generators.ar.sampler import ARSampler

        decode = self.decoder(device)
        if decode is None:
            return
        raw = getattr(model, "_orig_mod", model)
        was_training = raw.training  # the sampler switches the model to eval mode
        s = self.cfg.sample
        sampler = ARSampler(raw, batch_size=s.grid_at_checkpoint, cfg_scale=s.cfg_scale, cfg_until=s.cfg_until,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cuda_graphs=False)
        labels = torch.as_tensor(balanced_labels(s.grid_at_checkpoint, self.model.num_classes))
        autocast = torch.autocast("cuda", torch.bfloat16) if self._bf16(raw) else contextlib.nullcontext()
        try:
            with autocast:
                tokens = sampler.sample(labels, seed=step)
        finally:
            raw.train(was_training)
        save_image_grid(decode(tokens), runs.grid_path(run_dir, step))


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


__all__ = ["MODULE", "ARCH_KEYS", "ARTask", "check_token_cache", "validation_loss"]
