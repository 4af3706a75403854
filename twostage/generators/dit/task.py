"""`DiTTask`: the LightningDiT flow generator as a Task for the shared training engine.

One phase per step ("flow", optimizer "dit"): normalize the cached latents per channel, replace labels by
the null class with probability `label_dropout`, draw t (logit-normal) and noise, and regress the
velocity x_1 - eps at x_t (MSE + velocity-direction loss; time convention in flow.py). The EMA copy of
"dit" is what checkpoints sample from.

At each checkpoint: a validation flow loss with fixed noise and times (comparable across runs and
steps), and a grid of samples decoded by the cache's tokenizer when one is available.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.model import LightningDiT
from twostage.generators.dit.flow import flow_losses, interpolate, sample_time, velocity_target
from twostage.generators.dit.sampler import guided_velocity, solve

log = logging.getLogger(__name__)

Decoder = Callable[[torch.Tensor], torch.Tensor]  # de-normalized latents -> images in [-1, 1]


@dataclass
class LatentSpace:
    """What a DiT run knows about its latents (from the cache; saved as the run's model.json)."""

    channels: int
    grid: tuple[int, int]
    num_classes: int
    latent_mean: list[float] | None = None
    latent_std: list[float] | None = None
    image_size: int | None = None
    tokenizer_run: str = ""
    tokenizer_checksum: str = ""
    cache: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_cache_meta(cls, meta, cache: str | Path = "") -> LatentSpace:
        if meta.kind != "latents":
            raise ValueError(f"{cache or 'the cache'} holds {meta.kind}, not continuous latents: the DiT needs a "
                             "cache written by a KL tokenizer (twostage.tokenizers.kl.run.encode_latents)")
        return cls(channels=int(meta.channels), grid=tuple(meta.grid), num_classes=int(meta.num_classes),
                   latent_mean=meta.latent_mean, latent_std=meta.latent_std, image_size=meta.image_size,
                   tokenizer_run=meta.tokenizer_run, tokenizer_checksum=meta.tokenizer_checksum, cache=str(cache))

    def stats(self, device: torch.device, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) shaped (1, C, 1, 1); zeros / ones when not normalizing or when the cache has none."""
        c = self.channels
        if not normalize or self.latent_mean is None or self.latent_std is None:
            return torch.zeros(1, c, 1, 1, device=device), torch.ones(1, c, 1, 1, device=device)
        mean = torch.tensor(self.latent_mean, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(self.latent_std, dtype=torch.float32).clamp_min(1e-6).view(1, c, 1, 1)
        return mean.to(device), std.to(device)


def build_model(cfg: DiTRunConfig, space: LatentSpace) -> LightningDiT:
    return LightningDiT(cfg.model, space.channels, space.grid, space.num_classes)


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """n labels with equal counts per class (METHODS 9), grouped by class; the first n % K get one more."""
    return np.sort(np.arange(n, dtype=np.int64) % max(1, num_classes), kind="stable")


@torch.no_grad()
def generate_latents(model: nn.Module, labels: torch.Tensor, *, steps: int, sampler: str = "euler",
                     shift: float = 1.0, cfg_scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
                     generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                     precision: str = "fp32", null_label: int | None = None) -> torch.Tensor:
    """Normalized latents (N, C, h, w) float32 integrated from noise (at t = 0) to data (t = 1).

    The noise is `noise` when given, else drawn from `generator`. `model` may be a compiled wrapper;
    then pass `noise` and `null_label` (the wrapper need not expose the model's attributes).
    """
    device = labels.device
    if noise is None:
        noise = torch.randn(labels.shape[0], model.in_channels, *model.grid, generator=generator,
                            device=generator.device if generator is not None else device)
    noise = noise.to(device, torch.float32)
    fn = guided_velocity(model, labels, model.null_label if null_label is None else null_label, cfg_scale, interval)
    dtype = torch.bfloat16 if precision == "bf16" else None
    ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with ctx:
        return solve(fn, noise, steps, sampler, shift).float()


class DiTTask(TaskBase):
    def __init__(self, cfg: DiTRunConfig, space: LatentSpace, *, val_dataset=None,
                 decoder: Callable[[], Decoder | None] | None = None) -> None:
        """`decoder` is a factory, called at the first checkpoint, returning a latent decoder or None."""
        self.cfg, self.space = cfg, space
        self.modules: dict[str, nn.Module] = {"dit": build_model(cfg, space)}
        self.val_dataset = val_dataset
        self._decoder_factory = decoder
        self._decoder: Decoder | None = None
        self._decoder_tried = False
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- Task protocol --------------------------------------------------------------------------------

    def optimizers(self) -> dict[str, OptimSpec]:
        return {"dit": OptimSpec(["dit"], self.cfg.optim)}

    def phases(self) -> list[Phase]:
        return [Phase("flow", ["dit"], self.flow_loss)]

    def ema_modules(self) -> list[str]:
        return ["dit"]

    # -- training -------------------------------------------------------------------------------------

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:  # built once per device: no host-to-device copy per step
            self._stats[device] = self.space.stats(device, self.cfg.flow.normalize_latents)
        return self._stats[device]

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._device_stats(latents.device)
        return (latents.float() - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._device_stats(latents.device)
        return latents.float() * std + mean

    def _losses(self, model: nn.Module, x1: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred = model(interpolate(x1, noise, t), t, labels)
        return flow_losses(pred, velocity_target(x1, noise), self.cfg.flow.direction_weight)

    def flow_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents, labels = ctx.batch
        x1 = self.normalize(latents.to(ctx.device, non_blocking=True))
        labels = labels.to(ctx.device, non_blocking=True).long()
        n = x1.shape[0]
        if self.cfg.label_dropout > 0:
            drop = torch.rand(n, device=ctx.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.space.num_classes), labels)
        f = self.cfg.flow
        t = sample_time(n, kind=f.time_sampling, mean=f.logit_mean, std=f.logit_std, device=ctx.device)
        return self._losses(ctx.models["dit"], x1, labels, t, torch.randn_like(x1))

    # -- checkpoints ----------------------------------------------------------------------------------

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean flow loss over the validation cache with noise and times fixed by val.seed."""
        v = self.cfg.val
        n = len(self.val_dataset) if v.max_samples is None else min(v.max_samples, len(self.val_dataset))
        f = self.cfg.flow
        totals: dict[str, float] = {}
        count = 0
        for start in range(0, n, v.batch_size):
            items = [self.val_dataset[i] for i in range(start, min(n, start + v.batch_size))]
            x1 = self.normalize(torch.stack([torch.as_tensor(a) for a, _ in items]).to(device))
            labels = torch.tensor([int(b) for _, b in items], device=device)
            g = torch.Generator().manual_seed(v.seed * 1_000_003 + start)
            t = sample_time(len(items), kind=f.time_sampling, mean=f.logit_mean, std=f.logit_std, generator=g)
            noise = torch.randn(x1.shape, generator=g)
            loss, logs = self._losses(model, x1, labels, t.to(device), noise.to(device))
            for key, value in {"loss": loss, **logs}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(items)
            count += len(items)
        return {f"val/{k}": s / max(count, 1) for k, s in totals.items()}

    def decoder(self) -> Decoder | None:
        if not self._decoder_tried:
            self._decoder_tried = True
            if self._decoder_factory is not None:
                try:
                    self._decoder = self._decoder_factory()
                except Exception as err:  # a missing tokenizer must not stop training
                    log.warning("no sample grids at checkpoints: cannot load the cache's tokenizer (%s)", err)
        return self._decoder

    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> dict[str, float]:
        model = ema["dit"]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        logs: dict[str, float] = {}
        try:
            if self.val_dataset is not None and len(self.val_dataset):
                logs.update(self.validation_loss(model, device))
            s = self.cfg.sample
            if s.grid_at_checkpoint > 0 and (decode := self.decoder()) is not None:
                from twostage.common.images import save_grid

                labels = torch.from_numpy(balanced_labels(s.grid_at_checkpoint, self.space.num_classes)).to(device)
                g = torch.Generator(device=device).manual_seed(0)
                z = generate_latents(model, labels, steps=s.grid_steps, sampler=s.sampler, shift=s.shift,
                                     cfg_scale=s.cfg_scale, interval=(s.cfg_interval_start, s.cfg_interval_end),
                                     generator=g)
                images = decode(self.denormalize(z))
                save_grid(images.float().cpu(), Path(run_dir) / "samples" / f"samples_{step:07d}.png")
        finally:
            model.train(was_training)
        return logs


__all__ = ["DiTTask", "LatentSpace", "build_model", "generate_latents", "balanced_labels"]
