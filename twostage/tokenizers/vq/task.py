"""`VQTokenizerTask`: the VQ tokenizer (+ CRT, + PatchGAN) as a Task for the shared training engine.

Phases per step:
  autoencoder    steps "ae" (tokenizer) and "crt" (predictor): pixel + perceptual + VQ + GAN-generator
                 + ramped CRT loss; caches the detached reconstruction in ctx.scratch.
  discriminator  steps "disc" from `loss.disc_start` on, on the cached reconstruction (no recompute).

Everything logged is a device tensor (the engine syncs logs only at log steps); codebook usage is kept
on the device by `CodebookUsage` and reported every step as a window statistic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.crt import CausalPredictor, crt_loss, crt_weight
from twostage.tokenizers.discriminator import D_LOSSES, G_LOSSES, PatchGAN, adaptive_weight
from twostage.common.images import interleave_pairs, psnr, save_grid
from twostage.tokenizers.vq.model import VQModel
from twostage.tokenizers.perceptual import PerceptualLoss, build_perceptual
from twostage.tokenizers.vq.quantizer import CodebookUsage


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def batch_images(batch: Any) -> torch.Tensor:
    """Images out of whatever the loader yields: a tensor, (images, labels), or {"image": ...}."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "x"):
            if key in batch:
                return batch[key]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


def batch_labels(batch: Any, device: torch.device) -> torch.Tensor:
    """Class labels out of (images, labels) or {"label": ...} batches (class-conditional CRT only)."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return torch.as_tensor(batch[1]).to(device, non_blocking=True)
    if isinstance(batch, dict):
        for key in ("label", "labels", "y"):
            if key in batch:
                return torch.as_tensor(batch[key]).to(device, non_blocking=True)
    raise TypeError("crt.num_classes > 0 needs batches with labels: (images, labels) or {'label': ...}")


def _uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


class VQTokenizerTask(TaskBase):
    def __init__(self, cfg: VQRunConfig, *, image_size: int | None = None,
                 perceptual: nn.Module | None = None, channels_last: bool | None = None) -> None:
        """`perceptual` overrides the configured perceptual loss: a PerceptualLoss, or a backbone with
        `feature_maps(images, size)` (tests use a tiny stand-in). `channels_last` (default: when training
        compiled on CUDA) stores conv weights and activations NHWC: the fast layout for compiled bf16
        convolutions, but slower in eager mode, where GroupNorm copies NHWC inputs to NCHW."""
        self.cfg = cfg
        self.image_size = image_size or cfg.image_size
        tokenizer = VQModel(cfg.model)
        self.modules: dict[str, nn.Module] = {"tokenizer": tokenizer}
        if cfg.crt.enabled:
            if self.image_size is None:
                raise ValueError("the CRT predictor needs the image size (data.image_size) to size its positions")
            c = cfg.crt
            self.modules["crt"] = CausalPredictor(
                cfg.model.code_dim, tokenizer.grid_size(self.image_size), width=c.width, layers=c.layers,
                heads=c.heads, mlp_ratio=c.mlp_ratio, positions=c.positions, dropout=c.dropout,
                num_classes=c.num_classes,
            )
        if cfg.loss.gan_weight > 0:
            self.modules["disc"] = PatchGAN(cfg.model.out_channels, cfg.loss.disc_channels,
                                            cfg.loss.disc_layers, cfg.loss.disc_norm)
        if channels_last is None:  # measured on an H100 (VQ-16, batch 32): see benchmarks/bench_tokenizer.py
            channels_last = _uses_cuda(cfg.train.device) and cfg.train.compile
        self.channels_last = channels_last
        if self.channels_last:  # NHWC convolutions are the fast path for bf16 on tensor cores
            for name in ("tokenizer", "disc"):
                if name in self.modules:
                    self.modules[name].to(memory_format=torch.channels_last)
        loss = cfg.loss
        if perceptual is not None:
            is_loss = isinstance(perceptual, PerceptualLoss)
            self.perceptual = perceptual if is_loss else PerceptualLoss(perceptual, size=loss.perceptual_size)
        elif loss.perceptual_weight > 0:
            self.perceptual = build_perceptual(loss.perceptual, weights=loss.lpips_weights, heads=loss.lpips_heads,
                                               random_init=loss.lpips_random_init, size=loss.perceptual_size)
        else:
            self.perceptual = None
        self._perceptual_device: torch.device | None = None
        self.usage = CodebookUsage(cfg.model.codebook_size, cfg.monitor.usage_window)
        self._preview: torch.Tensor | None = None  # fixed images for the checkpoint reconstruction grid
        self._pixel = F.mse_loss if loss.pixel == "l2" else F.l1_loss
        self._g_loss = G_LOSSES[loss.gan_loss]
        self._d_loss = D_LOSSES[loss.gan_loss]

    # -- Task protocol --------------------------------------------------------------------------------

    def optimizers(self) -> dict[str, OptimSpec]:
        specs = {"ae": OptimSpec(["tokenizer"], self.cfg.optim.ae)}
        if "crt" in self.modules:
            specs["crt"] = OptimSpec(["crt"], self.cfg.optim.crt)
        if "disc" in self.modules:
            specs["disc"] = OptimSpec(["disc"], self.cfg.optim.disc)
        return specs

    def phases(self) -> list[Phase]:
        ae = ["ae"] + (["crt"] if "crt" in self.modules else [])
        phases = [Phase("autoencoder", ae, self.autoencoder_loss)]
        if "disc" in self.modules:
            start = self.cfg.loss.disc_start
            phases.append(Phase("discriminator", ["disc"], self.discriminator_loss, active=lambda step: step >= start))
        return phases

    def ema_modules(self) -> list[str]:
        return ["tokenizer"]

    def extra_state(self) -> dict[str, Any]:
        return {"usage": self.usage.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.usage.load_state_dict(state.get("usage", {}))

    # -- losses ---------------------------------------------------------------------------------------

    def _prepare(self, batch: Any, device: torch.device) -> torch.Tensor:
        x = batch_images(batch).to(device, non_blocking=True)
        want = self.cfg.model.in_channels
        if x.shape[1] != want:
            if x.shape[1] == 1 and want == 3:  # grayscale data through an RGB tokenizer
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"images have {x.shape[1]} channels but model.in_channels={want}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _perceptual_on(self, device: torch.device) -> nn.Module:
        if self._perceptual_device != device:
            self.perceptual.to(device)
            if self.channels_last:
                self.perceptual.to(memory_format=torch.channels_last)
            if device.type == "cuda":
                if self.cfg.train.compile:
                    self.perceptual.compile()
            self._perceptual_device = device
        return self.perceptual

    def autoencoder_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, lc = self.cfg, self.cfg.loss
        x = self._prepare(ctx.batch, ctx.device)
        if self._preview is None and cfg.monitor.grid_images > 0:
            self._preview = x[: cfg.monitor.grid_images].detach().clone()
        out = ctx.models["tokenizer"](x)
        recon = out.recon
        ctx.scratch["images"] = x
        ctx.scratch["recon"] = recon.detach()

        target = x if recon.shape[1] == x.shape[1] else x[:, :1]
        pixel = self._pixel(recon.float(), target.float())
        rec = lc.pixel_weight * pixel
        logs: dict[str, torch.Tensor] = {"pixel": pixel.detach()}
        if self.perceptual is not None and lc.perceptual_weight > 0:
            perc = self._perceptual_on(ctx.device)(recon, target).mean()
            rec = rec + lc.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        q = out.quant
        loss = rec + q.loss
        logs.update(codebook=q.codebook_loss.detach(), commit=q.commit_loss.detach())
        if cfg.model.entropy_weight > 0:
            logs["entropy"] = q.entropy_loss.detach()

        if "disc" in ctx.models and ctx.step >= lc.disc_start:
            g = self._g_loss(ctx.models["disc"](recon))
            if lc.adaptive_gan_weight:
                weight = adaptive_weight(rec, g, unwrap(ctx.models["tokenizer"]).decoder.last_layer)
                logs["gan_adaptive_weight"] = weight
            else:
                weight = 1.0
            loss = loss + lc.gan_weight * weight * g
            logs["gan_g"] = g.detach()

        if "crt" in ctx.models:
            w = crt_weight(ctx.step, cfg.crt.weight, cfg.crt.ramp_steps)
            labels = batch_labels(ctx.batch, ctx.device) if cfg.crt.num_classes > 0 else None
            c = crt_loss(ctx.models["crt"], out.latent, normalize=cfg.crt.normalize,
                         stop_grad_target=cfg.crt.stop_grad_target, labels=labels)
            loss = loss + w * c
            logs["crt"] = c.detach()
            logs["crt_weight"] = torch.full((), w, device=ctx.device)  # a device fill, not an H2D copy

        stats = self.usage.update(q.indices, ctx.step)
        logs.update(usage=stats["usage"], perplexity=stats["perplexity"], batch_perplexity=stats["batch_perplexity"])
        return loss, logs

    def discriminator_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = ctx.scratch.get("images")
        recon = ctx.scratch.get("recon")
        if x is None or recon is None:  # the autoencoder phase did not run on this micro-batch
            x = self._prepare(ctx.batch, ctx.device)
            with torch.no_grad():
                recon = ctx.models["tokenizer"](x).recon
        if recon.shape[1] != x.shape[1]:
            x = x[:, :1]
        disc = ctx.models["disc"]
        logits_real = disc(x.detach())
        logits_fake = disc(recon.detach())
        d = self._d_loss(logits_real, logits_fake)
        logs = {"d": d.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        return self.cfg.loss.gan_weight * d, logs

    # -- checkpoints ------------------------------------------------------------------------------------

    @torch.no_grad()
    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> dict[str, float]:
        logs: dict[str, float] = {}
        if self.usage.last_seen is not None:
            logs["tokenizer/codebook_usage"] = float(self.usage.usage(step))
        if self._preview is None:
            return logs
        model = unwrap(ema["tokenizer"])
        was_training = model.training
        model.eval()
        x = self._preview.to(next(model.parameters()).device)
        recon = model(x).recon.float().clamp(-1, 1)
        model.train(was_training)
        target = x if recon.shape[1] == x.shape[1] else x[:, :1]
        grid, nrow = interleave_pairs(target.float().cpu(), recon.cpu())
        save_grid(grid, Path(run_dir) / "samples" / f"recon_{step:07d}.png", nrow=nrow)
        logs["tokenizer/preview_psnr"] = float(psnr(recon, target).mean())
        return logs
