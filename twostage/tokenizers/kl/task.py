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

import torch
from torch import nn

from twostage.engine.task import OptimSpec, PhaseContext, unwrap
from twostage.tokenizers.autoencoder_task import AutoencoderTask
from twostage.tokenizers.discriminator import adaptive_weights
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel
from twostage.tokenizers.kl.vf_loss import FoundationFeatures, build_foundation, vf_loss


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


class KLTokenizerTask(AutoencoderTask):
    def __init__(self, cfg: KLRunConfig, *, perceptual: nn.Module | None = None, vf_network: nn.Module | None = None,
                 channels_last: bool | None = None) -> None:
        """`perceptual`, `channels_last`: see AutoencoderTask; `vf_network` replaces the VF feature
        network (tests use tiny stand-ins)."""
        super().__init__(cfg, perceptual=perceptual, channels_last=channels_last)
        self.features: FoundationFeatures | None = None
        if cfg.vf.enabled:
            v = cfg.vf
            kw = dict(layer=v.layer, input_size=v.input_size, resample=v.resample)
            shared = self.perceptual.backbone if perceptual is None and self.perceptual is not None and \
                cfg.loss.perceptual == v.network else None  # one frozen network serves both losses
            if vf_network is not None:
                self.features = FoundationFeatures(vf_network, **kw)
            elif shared is not None:
                self.features = FoundationFeatures(shared, **kw)
            else:
                self.features = build_foundation(v.network, v.weights, **kw)
            self.frozen.append(self.features)
        model = KLModel(cfg.model)
        self.modules["tokenizer"] = model
        self.modules["aux"] = KLLossParams(cfg.loss.logvar_init, model.latent_channels,
                                           self.features.channels if self.features is not None else None)
        self._finish_init()

    def optimizers(self) -> dict[str, OptimSpec]:
        specs = {"ae": OptimSpec(["tokenizer", "aux"], self.cfg.optim.ae)}
        if "disc" in self.modules:
            specs["disc"] = OptimSpec(["disc"], self.cfg.optim.disc)
        return specs

    def preview_reconstruction(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x, sample=False).recon

    def autoencoder_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, lc = self.cfg, self.cfg.loss
        x, out, target = self.forward_autoencoder(ctx)
        recon = out.recon

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
        vf = None
        gan = self.generator_adversarial(ctx, recon)
        if gan is not None:
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
            loss = loss + lc.gan_weight * weights.get("gan", 1.0) * gan
            if "gan" in weights:
                logs["gan_adaptive_weight"] = weights["gan"]
        if vf is not None:
            loss = loss + cfg.vf.weight * weights.get("vf", 1.0) * vf
            if "vf" in weights:
                logs["vf_adaptive_weight"] = weights["vf"]
        return loss, logs


__all__ = ["KLTokenizerTask", "KLLossParams"]
