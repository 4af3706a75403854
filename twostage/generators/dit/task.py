"""`DiTTask`: the LightningDiT flow generator as a Task for the shared training engine.

One phase per step ("flow", optimizer "dit"): normalize the cached latents per channel, replace labels by
the null class with probability `label_dropout`, draw t (logit-normal) and noise, and regress the
velocity x_1 - eps at x_t (MSE + velocity-direction loss, LightningDiT arXiv 2501.01423; time
convention in flow.py). The EMA copy of "dit" is what checkpoints sample from.

Options (off by default): `flow.shift_base_dim` shifts the drawn times with RAE's dimension-dependent
shift (flow.dimension_shift; the same shift multiplies the sampling shift in `generate_latents`), and
`repa.enabled` adds REPA's alignment term, logged as flow/repa, with its projector as a second trained
module "repa" (repa.py: the clean images are the cache's tokenizer decoding the clean latents).

At each checkpoint (the engine forks the RNG around it, so the training RNG stream is untouched): a validation
flow loss with fixed noise and times (comparable across runs and steps) logged and written to
RUN/val/step_XXXXXXX.json, the training compute so far, and a grid of samples decoded by the cache's
tokenizer when one is available. RUN/model.json (`record`, set by run.py's `build_task`) is written at
`on_start`, once the engine has accepted the run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from twostage.config import ConfigError
from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase
from twostage.engine.run_files import write_val_record
from twostage.generators import runs
from twostage.generators.dit.config import DiTRunConfig
from twostage.generators.dit.flow import (dimension_shift, flow_losses, interpolate, sample_time, shift_time,
                                          velocity_target)
from twostage.generators.dit.model import LightningDiT
from twostage.generators.dit.repa import Projector, RepaTargets, repa_active, repa_loss
from twostage.generators.dit.sampler import guided_velocity, solve
from twostage.generators.outputs import Decoder, LazyDecoder, balanced_labels, load_decoder, save_image_grid

MODULE = "dit"  # key prefix of the model's weights in checkpoints
REPA = "repa"  # key prefix of REPA's projector (only in runs with repa.enabled; not part of the generator)
# one model per folder; "ddt" is in model.json only when the DDT head is on (absent = absent: older runs match)
ARCH_KEYS = ("layers", "width", "heads", "patch_size", "channels", "grid", "num_classes", "ddt")


@dataclass
class LatentSpace:
    """What a DiT run knows about its latents (from the cache; recorded in the run's model.json)."""

    channels: int
    grid: tuple[int, int]
    num_classes: int
    latent_mean: list[float] | None = None
    latent_std: list[float] | None = None
    image_size: int | None = None
    tokenizer_run: str = ""
    tokenizer_checksum: str = ""

    @classmethod
    def from_cache_meta(cls, meta, cache: str | Path = "") -> LatentSpace:
        if meta.kind != "latents":
            raise ConfigError(f"{cache or 'the cache'} holds {meta.kind}, not continuous latents: the DiT needs a "
                              "cache written by a KL tokenizer (`twostage tokenizer encode` of a kl run)")
        return cls(channels=int(meta.channels), grid=tuple(meta.grid), num_classes=int(meta.num_classes),
                   latent_mean=meta.latent_mean, latent_std=meta.latent_std, image_size=meta.image_size,
                   tokenizer_run=meta.tokenizer_run, tokenizer_checksum=meta.tokenizer_checksum)

    @classmethod
    def from_model_json(cls, info: Mapping[str, Any]) -> LatentSpace:
        return cls(channels=int(info["channels"]), grid=tuple(info["grid"]), num_classes=int(info["num_classes"]),
                   latent_mean=info.get("latent_mean"), latent_std=info.get("latent_std"),
                   image_size=info.get("image_size"), tokenizer_run=info.get("tokenizer_run", ""),
                   tokenizer_checksum=info.get("tokenizer_checksum", ""))

    def stats(self, device: torch.device, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) shaped (1, C, 1, 1); zeros / ones when not normalizing or when the cache has none."""
        c = self.channels
        if not normalize or self.latent_mean is None or self.latent_std is None:
            return torch.zeros(1, c, 1, 1, device=device), torch.ones(1, c, 1, 1, device=device)
        mean = torch.tensor(self.latent_mean, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(self.latent_std, dtype=torch.float32).clamp_min(1e-6).view(1, c, 1, 1)
        return mean.to(device), std.to(device)


def build_model(cfg: DiTRunConfig, space: LatentSpace) -> LightningDiT:
    model = LightningDiT(cfg.model, space.channels, space.grid, space.num_classes)
    model.time_shift = dimension_shift(space.channels * space.grid[0] * space.grid[1], cfg.flow.shift_base_dim)
    return model


@torch.no_grad()
def generate_latents(model: nn.Module, labels: torch.Tensor, *, steps: int, sampler: str = "euler",
                     shift: float = 1.0, cfg_scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
                     generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                     precision: str = "fp32", null_label: int | None = None) -> torch.Tensor:
    """Normalized latents (N, C, h, w) float32 integrated from noise (at t = 0) to data (t = 1).

    cfg_scale follows the one guidance rule (twostage/generators/guidance.py; 1 = none). The noise is
    `noise` when given, else drawn from `generator`. `model` may be a compiled wrapper; then pass
    `noise` and `null_label` (the wrapper need not expose the model's attributes). The grid's shift is
    `shift` times the model's `time_shift` (the dimension-dependent shift it trained with; 1 when off).
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
        return solve(fn, noise, steps, sampler, shift * getattr(model, "time_shift", 1.0)).float()


class DiTTask(TaskBase):
    record: dict[str, Any] | None = None  # RUN/model.json (runs.model_record + latent statistics), at on_start

    def __init__(self, cfg: DiTRunConfig, space: LatentSpace, *, val_dataset=None,
                 decoder: Callable[[torch.device], Decoder | None] | None = None,
                 repa_network: nn.Module | None = None) -> None:
        """`decoder(device)` makes the decoder (de-normalized latents -> images in [-1, 1]) of the
        checkpoint grids, at the first checkpoint, and of REPA's targets, at the first step; default: the
        cache's tokenizer. `repa_network` replaces the feature network named by repa.encoder."""
        self.cfg, self.space = cfg, space
        self.model = build_model(cfg, space)
        self.modules: dict[str, nn.Module] = {MODULE: self.model}
        self.repa: RepaTargets | None = None
        if cfg.repa.enabled:
            r = cfg.repa
            if decoder is None and not space.tokenizer_run:
                raise ConfigError("repa.enabled needs the tokenizer run that wrote the cache (to decode latents "
                                  "into images), and the cache names none")
            decode = decoder or (lambda device: load_decoder(space.tokenizer_run, device,
                                                             space.tokenizer_checksum).decode)
            self.repa = RepaTargets.build(r.encoder, r.encoder_weights, decode, self.model.tokens_grid,
                                          network=repa_network)
            self.modules[REPA] = Projector(self.model.width, r.projector_dim, self.repa.channels)
        self.val_dataset = val_dataset
        self.decoder = (LazyDecoder.from_tokenizer_run(space.tokenizer_run, space.tokenizer_checksum)
                        if decoder is None else LazyDecoder(decoder))
        tokens = space.grid[0] * space.grid[1]
        self.tokens_per_step = tokens * cfg.train.batch_size
        # training FLOPs per latent position: the DiT, plus REPA's projector on every patch token (3 x its
        # forward; the frozen decoder and encoder that make REPA's targets are not counted: no gradient)
        flops = self.model.flops_per_token()["train"]
        if self.repa is not None:
            flops += 3.0 * self.modules[REPA].flops_per_token() / self.model.patch ** 2
        self.train_flops_per_token = flops
        self.flops_per_step = flops * self.tokens_per_step
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- Task protocol --------------------------------------------------------------------------------

    def optimizers(self) -> dict[str, OptimSpec]:
        return {MODULE: OptimSpec([MODULE, REPA] if self.repa is not None else [MODULE], self.cfg.optim)}

    def phases(self) -> list[Phase]:
        return [Phase("flow", [MODULE], self.flow_loss)]

    def ema_modules(self) -> list[str]:
        return [MODULE]

    def on_start(self, run_dir: Path, resumed: bool) -> None:
        if self.record is not None:
            runs.write_model(run_dir, self.record, ARCH_KEYS)

    # -- training -------------------------------------------------------------------------------------

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:  # built once per device: no host-to-device copy per step
            self._stats[device] = self.space.stats(device, self.cfg.flow.normalize_latents)
        return self._stats[device]

    def replica_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The cache's latent statistics: stacked replicas on several caches each normalize with their own."""
        mean, std = self._device_stats(device)
        return {"latent_mean": mean, "latent_std": std}

    def normalize(self, latents: torch.Tensor, replica: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(latents - mean) / std with this cache's statistics, or with `replica`'s (a stacked replica's own
        cache, PhaseContext.replica) when given."""
        if replica:
            mean, std = replica["latent_mean"], replica["latent_std"]
        else:
            mean, std = self._device_stats(latents.device)
        return (latents.float() - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._device_stats(latents.device)
        return latents.float() * std + mean

    def shift_times(self, t: torch.Tensor) -> torch.Tensor:
        """Drawn times after the dimension-dependent shift (unchanged when it is off)."""
        s = self.model.time_shift
        return t if s == 1.0 else shift_time(t, s)

    def _losses(self, model: nn.Module, x1: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred = model(interpolate(x1, noise, t), t, labels)
        return flow_losses(pred, velocity_target(x1, noise), self.cfg.flow.direction_weight)

    def flow_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents, labels = ctx.batch
        latents = latents.to(ctx.device, non_blocking=True)
        x1 = self.normalize(latents, ctx.replica)
        labels = labels.to(ctx.device, non_blocking=True).long()
        n = x1.shape[0]
        if self.cfg.label_dropout > 0:  # classifier-free guidance: learn the unconditional model on the null class
            drop = torch.rand(n, device=ctx.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.space.num_classes), labels)
        f = self.cfg.flow
        t = self.shift_times(sample_time(n, kind=f.time_sampling, mean=f.logit_mean, std=f.logit_std,
                                         device=ctx.device))
        noise = torch.randn_like(x1)
        r = self.cfg.repa
        if self.repa is None or not repa_active(ctx.step, r.stop_step):
            return self._losses(ctx.models[MODULE], x1, labels, t, noise)
        features = self.repa(latents.float())  # (N, T, D): decoder + encoder, frozen, no gradients
        pred, hidden = ctx.models[MODULE](interpolate(x1, noise, t), t, labels, hidden_at=r.layer)
        loss, logs = flow_losses(pred, velocity_target(x1, noise), f.direction_weight)
        align = repa_loss(ctx.models[REPA](hidden), features)
        logs["repa"] = align.detach()
        return loss + r.weight * align, logs

    # -- checkpoints ----------------------------------------------------------------------------------

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Mean flow loss terms ({"loss", "mse", "direction"}) over the validation cache, with noise and
        times fixed by val.seed (their own generator: the global RNG is not touched)."""
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
            t = self.shift_times(sample_time(len(items), kind=f.time_sampling, mean=f.logit_mean, std=f.logit_std,
                                             generator=g))
            noise = torch.randn(x1.shape, generator=g)
            loss, logs = self._losses(model, x1, labels, t.to(device), noise.to(device))
            for key, value in {"loss": loss, **logs}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(items)
            count += len(items)
        return {**{k: s / max(count, 1) for k, s in totals.items()}, "num_samples": count}

    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> dict[str, float]:
        model = ema[MODULE]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        logs = runs.compute_logs(step, self.flops_per_step, self.tokens_per_step)
        try:
            if self.val_dataset is not None and len(self.val_dataset):
                result = self.validation_loss(model, device)
                weights = "ema" if self.cfg.train.ema_decay else "raw"
                write_val_record(run_dir, step, {**result, "weights": weights,
                                                 "train_flops": logs["compute/train_flops"],
                                                 "tokens_seen": logs["compute/tokens_seen"]})
                logs.update({f"val/{k}": v for k, v in result.items() if k != "num_samples"})
            if self.cfg.sample.grid_at_checkpoint > 0:
                self._sample_grid(model, step, Path(run_dir), device)
        finally:
            model.train(was_training)
        return logs

    def _sample_grid(self, model: nn.Module, step: int, run_dir: Path, device: torch.device) -> None:
        decode = self.decoder(device)
        if decode is None:
            return
        s = self.cfg.sample
        labels = torch.from_numpy(balanced_labels(s.grid_at_checkpoint, self.space.num_classes)).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        z = generate_latents(model, labels, steps=s.grid_steps, sampler=s.sampler, shift=s.shift,
                             cfg_scale=s.cfg_scale, interval=(s.cfg_interval_start, s.cfg_interval_end), generator=g)
        save_image_grid(decode(self.denormalize(z)), runs.grid_path(run_dir, step))


__all__ = ["MODULE", "REPA", "ARCH_KEYS", "DiTTask", "LatentSpace", "build_model", "generate_latents"]
