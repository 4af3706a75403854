"""`VQTokenizerTask`: the VQ tokenizer (+ CRT, + PatchGAN) as a Task for the shared training engine.

Phases per step (shared with every tokenizer: twostage/tokenizers/autoencoder_task.py):
  autoencoder    steps "ae" (tokenizer) and "crt" (predictor): pixel + perceptual + VQ + GAN-generator
                 + ramped CRT loss (arXiv:2412.16326); caches the detached reconstruction in ctx.scratch.
  discriminator  steps "disc" from `loss.disc_start` on, on the cached reconstruction (no recompute).

Everything logged is a device tensor (the engine syncs logs only at log steps); codebook usage is kept
on the device by `CodebookUsage` and reported every step as a window statistic. As one of K stacked
replicas (AutoencoderTask.as_replica) the loss runs under vmap and cannot update that window in place:
a replica's codebook usage is then reported at checkpoints only, by validation (val/codebook_usage).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from twostage.engine.task import OptimSpec, PhaseContext, unwrap
from twostage.tokenizers.autoencoder_task import AutoencoderTask
from twostage.tokenizers.discriminator import adaptive_weights
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.crt import CausalPredictor, crt_loss, crt_weight
from twostage.tokenizers.vq.model import VQModel
from twostage.tokenizers.vq.quantizer import CodebookUsage


def batch_labels(batch: Any, device: torch.device) -> torch.Tensor:
    """Class labels out of (images, labels) or {"label": ...} batches (class-conditional CRT only)."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return torch.as_tensor(batch[1]).to(device, non_blocking=True)
    if isinstance(batch, dict):
        for key in ("label", "labels", "y"):
            if key in batch:
                return torch.as_tensor(batch[key]).to(device, non_blocking=True)
    raise TypeError("crt.num_classes > 0 needs batches with labels: (images, labels) or {'label': ...}")


class VQTokenizerTask(AutoencoderTask):
    def __init__(self, cfg: VQRunConfig, *, image_size: int | None = None,
                 perceptual: nn.Module | None = None, channels_last: bool | None = None) -> None:
        """`perceptual`, `channels_last`: see AutoencoderTask. `image_size` sizes the CRT predictor's
        positions (default: data.image_size)."""
        super().__init__(cfg, perceptual=perceptual, channels_last=channels_last)
        self.image_size = image_size or cfg.image_size
        tokenizer = VQModel(cfg.model)
        self.modules["tokenizer"] = tokenizer
        if cfg.crt.enabled:
            c = cfg.crt
            self.modules["crt"] = CausalPredictor(
                cfg.model.code_dim, tokenizer.grid_size(self.image_size), width=c.width, layers=c.layers,
                heads=c.heads, mlp_ratio=c.mlp_ratio, positions=c.positions, dropout=c.dropout,
                num_classes=c.num_classes,
            )
        self._finish_init()
        tokenizer.channels_last_codes = self.channels_last  # the images come NHWC then (AutoencoderTask.prepare)
        self.usage = CodebookUsage(cfg.model.codebook_size, cfg.monitor.usage_window)
        self._pixel = F.mse_loss if cfg.loss.pixel == "l2" else F.l1_loss

    # -- Task protocol --------------------------------------------------------------------------------

    def optimizers(self) -> dict[str, OptimSpec]:
        specs = {"ae": OptimSpec(["tokenizer"], self.cfg.optim.ae)}
        if "crt" in self.modules:
            specs["crt"] = OptimSpec(["crt"], self.cfg.optim.crt)
        if "disc" in self.modules:
            specs["disc"] = OptimSpec(["disc"], self.cfg.optim.disc)
        return specs

    def as_replica(self) -> None:
        super().as_replica()
        self.modules["tokenizer"].channels_last_codes = False  # the codes stay NCHW with the images

    def extra_state(self) -> dict[str, Any]:
        return {"usage": self.usage.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.usage.load_state_dict(state.get("usage", {}))

    # -- losses ---------------------------------------------------------------------------------------

    def autoencoder_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, lc = self.cfg, self.cfg.loss
        x, out, target = self.forward_autoencoder(ctx)
        recon = out.recon
        pixel = self._pixel(recon.float(), target.float())
        rec = lc.pixel_weight * pixel
        logs: dict[str, torch.Tensor] = {"pixel": pixel.detach()}
        if self.perceptual is not None and lc.perceptual_weight > 0:
            perc = self.perceptual(recon, target).mean()
            rec = rec + lc.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        q = out.quant
        loss = rec + q.loss
        logs.update(codebook=q.codebook_loss.detach(), commit=q.commit_loss.detach())
        if cfg.model.entropy_weight > 0:
            logs["entropy"] = q.entropy_loss.detach()

        g = self.generator_adversarial(ctx, recon)
        if g is not None:
            if lc.adaptive_gan_weight:  # taming VQGAN's balance at the decoder's last layer
                layer = unwrap(ctx.models["tokenizer"]).decoder.last_layer
                weight = adaptive_weights(rec, {"gan": (g, layer)})["gan"]
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

        if not self.replica_mode:  # an in-place update of the task's window, which vmap cannot batch
            stats = self.usage.update(q.indices, ctx.step)
            logs.update(usage=stats["usage"], perplexity=stats["perplexity"],
                        batch_perplexity=stats["batch_perplexity"])
        return loss, logs

    # -- checkpoints ----------------------------------------------------------------------------------

    def preview_reconstruction(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).recon

    def validation_reconstruction(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        return out.recon, out.quant.indices

    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> dict[str, float]:
        logs = super().on_checkpoint(step, run_dir, ema)
        if self.usage.last_seen is not None:
            logs["tokenizer/codebook_usage"] = float(self.usage.usage(step))
        return logs


__all__ = ["VQTokenizerTask", "batch_labels"]
