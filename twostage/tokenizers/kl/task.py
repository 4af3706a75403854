"""`KLTokenizerTask`: the KL-VAE (+ VF loss, + PatchGAN) as a Task for the shared training engine.

Phases per step, as in the VQ task (twostage/tokenizers/vq/task.py):
  autoencoder    steps "ae" (the autoencoder and "aux": the learned log-variance and the VF projection):
                 NLL = (L1 + perceptual) / exp(logvar) + logvar, summed over pixels and averaged over
                 images (LDM), + kl_weight * KL + adaptive GAN-generator term + adaptive VF term;
                 caches the detached reconstruction in ctx.scratch.
  discriminator  steps "disc" from `loss.disc_start` on, on the cached reconstruction.

Adaptive weights (taming / LDM / VA-VAE): w = clamp(||grad NLL|| / (||grad L|| + 1e-4), 0, max) x weight,
the gradients taken at the decoder's last layer for the GAN term and at the encoder's last layer for
the VF term. Both NLL gradients come from one autograd call. Everything logged is a device tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase
from twostage.tokenizers.discriminator import D_LOSSES, G_LOSSES, PatchGAN
from twostage.common.images import interleave_pairs, psnr, save_grid
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel
from twostage.tokenizers.perceptual import PerceptualLoss, build_perceptual
from twostage.tokenizers.vq.task import _uses_cuda, batch_images, unwrap
from twostage.tokenizers.kl.vf_loss import FoundationFeatures, build_foundation, vf_loss


def adaptive_weights(rec_loss: torch.Tensor, terms: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     max_weight: dict[str, float] | float = 1e4) -> dict[str, torch.Tensor]:
    """{name: clamp(||d rec / d W|| / (||d term / d W|| + 1e-4), 0, max)} for terms {name: (loss, W)}.

    The reconstruction gradients at all layers come from one backward pass; weights are detached
    device tensors (no host sync).
    """
    layers = list({id(w): w for _, w in terms.values()}.values())
    rec_grads = torch.autograd.grad(rec_loss, layers, retain_graph=True)
    rec_norm = {id(w): g.float().norm() for w, g in zip(layers, rec_grads)}
    out = {}
    for name, (loss, layer) in terms.items():
        grad = torch.autograd.grad(loss, layer, retain_graph=True)[0]
        cap = max_weight[name] if isinstance(max_weight, dict) else max_weight
        out[name] = (rec_norm[id(layer)] / (grad.float().norm() + 1e-4)).clamp(0.0, cap).detach()
    return out


class KLLossParams(nn.Module):
    """Trainable parts of the loss: the likelihood's log-variance and the VF projection z' = W z."""

    def __init__(self, logvar_init: float, latent_channels: int, vf_channels: int | None) -> None:
        super().__init__()
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.vf_proj = nn.Conv2d(latent_channels, vf_channels, 1, bias=False) if vf_channels else None

    def forward(self, rec: torch.Tensor, latent: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(NLL, z' or None). Both uses go through forward so data-parallel wrappers see them.

        NLL = rec / exp(logvar) + logvar, summed over pixels and averaged over images (LDM's scale,
        which the KL weight 1e-6 is set for).
        """
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / rec.shape[0]
        z_proj = self.vf_proj(latent) if latent is not None and self.vf_proj is not None else None
        return nll, z_proj


class KLTokenizerTask(TaskBase):
    def __init__(self, cfg: KLRunConfig, *, perceptual: nn.Module | None = None, vf_network: nn.Module | None = None,
                 channels_last: bool | None = None) -> None:
        """`perceptual` overrides the configured perceptual loss (a PerceptualLoss or a backbone with
        `feature_maps`); `vf_network` overrides the VF feature network (tests use tiny stand-ins)."""
        self.cfg = cfg
        lc = cfg.loss
        backbone = None
        if perceptual is not None:
            self.perceptual = perceptual if isinstance(perceptual, PerceptualLoss) else \
                PerceptualLoss(perceptual, size=lc.perceptual_size)
        elif lc.perceptual_weight > 0 and lc.perceptual != "none":
            self.perceptual = build_perceptual(lc.perceptual, weights=lc.lpips_weights, heads=lc.lpips_heads,
                                               random_init=lc.lpips_random_init, size=lc.perceptual_size)
            if lc.perceptual == "effnet-lite0":
                backbone = self.perceptual.backbone  # the VF loss can share the frozen network
        else:
            self.perceptual = None
        self.features: FoundationFeatures | None = None
        if cfg.vf.enabled:
            v = cfg.vf
            kw = dict(layer=v.layer, input_size=v.input_size, resample=v.resample)
            if vf_network is not None:
                self.features = FoundationFeatures(vf_network, **kw)
            elif backbone is not None and v.network == "effnet-lite0":
                self.features = FoundationFeatures(backbone, **kw)
            else:
                self.features = build_foundation(v.network, v.weights, **kw)
        model = KLModel(cfg.model)
        self.modules: dict[str, nn.Module] = {
            "tokenizer": model,
            "aux": KLLossParams(lc.logvar_init, model.latent_channels,
                                self.features.channels if self.features is not None else None),
        }
        if lc.gan_weight > 0:
            self.modules["disc"] = PatchGAN(cfg.model.out_channels, lc.disc_channels, lc.disc_layers, lc.disc_norm)
        self.channels_last = _uses_cuda(cfg.train.device) if channels_last is None else channels_last
        if self.channels_last:  # NHWC convolutions are the fast path for bf16 on tensor cores
            for name in ("tokenizer", "disc"):
                if name in self.modules:
                    self.modules[name].to(memory_format=torch.channels_last)
        self._frozen_device: torch.device | None = None
        self._preview: torch.Tensor | None = None
        self._g_loss, self._d_loss = G_LOSSES[lc.gan_loss], D_LOSSES[lc.gan_loss]

    # -- Task protocol --------------------------------------------------------------------------------

    def optimizers(self) -> dict[str, OptimSpec]:
        specs = {"ae": OptimSpec(["tokenizer", "aux"], self.cfg.optim.ae)}
        if "disc" in self.modules:
            specs["disc"] = OptimSpec(["disc"], self.cfg.optim.disc)
        return specs

    def phases(self) -> list[Phase]:
        phases = [Phase("autoencoder", ["ae"], self.autoencoder_loss)]
        if "disc" in self.modules:
            start = self.cfg.loss.disc_start
            phases.append(Phase("discriminator", ["disc"], self.discriminator_loss, active=lambda step: step >= start))
        return phases

    def ema_modules(self) -> list[str]:
        return ["tokenizer"]

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

    def _frozen_on(self, device: torch.device) -> None:
        """Move the frozen networks (not task modules: never checkpointed) to the training device once."""
        if self._frozen_device != device:
            for net in (self.perceptual, self.features):
                if net is not None:
                    net.to(device)
                    if self.channels_last:
                        net.to(memory_format=torch.channels_last)
            self._frozen_device = device

    def autoencoder_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, lc = self.cfg, self.cfg.loss
        self._frozen_on(ctx.device)
        x = self._prepare(ctx.batch, ctx.device)
        if self._preview is None and cfg.monitor.grid_images > 0:
            self._preview = x[: cfg.monitor.grid_images].detach().clone()
        out = ctx.models["tokenizer"](x)
        recon = out.recon
        ctx.scratch["images"], ctx.scratch["recon"] = x, recon.detach()
        target = x if recon.shape[1] == x.shape[1] else x[:, :1]

        diff = recon.float() - target.float()
        pixel = diff.abs() if lc.pixel == "l1" else diff.pow(2)
        rec = lc.pixel_weight * pixel
        logs: dict[str, torch.Tensor] = {"pixel": pixel.detach().mean()}
        if self.perceptual is not None and lc.perceptual_weight > 0:
            perc = self.perceptual(recon, target)  # (N,)
            rec = rec + lc.perceptual_weight * perc.view(-1, 1, 1, 1)
            logs["perceptual"] = perc.detach().mean()
        nll, z_proj = ctx.models["aux"](rec, out.latent if self.features is not None else None)
        kl = out.posterior.kl().mean()
        loss = nll + lc.kl_weight * kl
        logs.update(nll=nll.detach(), kl=kl.detach(), logvar=unwrap(ctx.models["aux"]).logvar.detach().clone(),
                    latent_std=out.posterior.mean.detach().std())

        terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        model = unwrap(ctx.models["tokenizer"])
        gan = vf = None
        if "disc" in ctx.models and ctx.step >= lc.disc_start:
            gan = self._g_loss(ctx.models["disc"](recon))
            logs["gan_g"] = gan.detach()
            if lc.adaptive_gan_weight:
                terms["gan"] = (gan, model.decoder_last_layer)
        if self.features is not None:
            v = cfg.vf
            feats = self.features(x, tuple(out.latent.shape[-2:]))
            vf, vf_logs = vf_loss(z_proj, feats, z=out.latent if v.distmat_on == "latent" else None,
                                  cos_margin=v.cos_margin, distmat_margin=v.distmat_margin,
                                  cos_weight=v.cos_weight, distmat_weight=v.distmat_weight)
            logs.update(vf=vf.detach(), **vf_logs)
            if v.adaptive:
                terms["vf"] = (vf, model.encoder_last_layer)
        weights = adaptive_weights(nll, terms, {"gan": lc.adaptive_max, "vf": cfg.vf.adaptive_max}) if terms else {}
        if gan is not None:
            w = lc.gan_weight * weights.get("gan", 1.0)
            loss = loss + w * gan
            if "gan" in weights:
                logs["gan_adaptive_weight"] = weights["gan"]
        if vf is not None:
            w = cfg.vf.weight * weights.get("vf", 1.0)
            loss = loss + w * vf
            if "vf" in weights:
                logs["vf_adaptive_weight"] = weights["vf"]
        return loss, logs

    def discriminator_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, recon = ctx.scratch.get("images"), ctx.scratch.get("recon")
        if x is None or recon is None:  # the autoencoder phase did not run on this micro-batch
            x = self._prepare(ctx.batch, ctx.device)
            with torch.no_grad():
                recon = ctx.models["tokenizer"](x).recon
        if recon.shape[1] != x.shape[1]:
            x = x[:, :1]
        disc = ctx.models["disc"]
        logits_real, logits_fake = disc(x.detach()), disc(recon.detach())
        d = self._d_loss(logits_real, logits_fake)
        logs = {"d": d.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        return self.cfg.loss.gan_weight * d, logs

    # -- checkpoints ------------------------------------------------------------------------------------

    @torch.no_grad()
    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> dict[str, float]:
        if self._preview is None:
            return {}
        model = unwrap(ema["tokenizer"])
        was_training = model.training
        model.eval()
        x = self._preview.to(next(model.parameters()).device)
        recon = model(x, sample=False).recon.float().clamp(-1, 1)
        model.train(was_training)
        target = x if recon.shape[1] == x.shape[1] else x[:, :1]
        grid, nrow = interleave_pairs(target.float().cpu(), recon.cpu())
        save_grid(grid, Path(run_dir) / "samples" / f"recon_{step:07d}.png", nrow=nrow)
        return {"tokenizer/preview_psnr": float(psnr(recon, target).mean())}


__all__ = ["KLTokenizerTask", "KLLossParams", "adaptive_weights"]
