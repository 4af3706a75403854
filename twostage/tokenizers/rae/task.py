"""`RAETokenizerTask`: RAE's decoder training as a Task for the shared engine (docs/methods.md §7, (7.10)-(7.12)).

Phases per step, as every autoencoder (twostage/tokenizers/autoencoder_task.py):
  autoencoder    steps "ae" (the decoder only: the encoder is outside the model's parameters) on
                 pixel (L1) + perceptual + gan_weight x adaptive weight x GAN-generator term, the decoder
                 reading the noised latent z + sigma * eps, sigma ~ U(0, tau) per image (7.10)-(7.11);
  discriminator  from `loss.disc_start` on, the shared PatchGAN on the cached reconstruction.

At the start of a fresh run (`on_start`), with `norm.enabled`, the per-channel mean and standard deviation
of the clean encoder output over the first `norm.images` images of the configured training split go into
the model's buffers, i.e. into every checkpoint and weights file, and into RUN/latent_stats.json for
people; a resumed run keeps the ones its checkpoint holds. The split is read as validation reads its own
(never augmented), so every process computes the same numbers; a dataset passed to `train_run` in place
of the configured one does not change them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from twostage.engine.task import OptimSpec, PhaseContext, unwrap
from twostage.generators.runs import is_main_process
from twostage.tokenizers.autoencoder_task import AutoencoderTask
from twostage.tokenizers.discriminator import adaptive_weights
from twostage.tokenizers.rae.config import RAERunConfig
from twostage.tokenizers.rae.model import RAEModel

log = logging.getLogger(__name__)

STATS_FILE = "latent_stats.json"


class RAETokenizerTask(AutoencoderTask):
    def __init__(self, cfg: RAERunConfig, *, perceptual: nn.Module | None = None,
                 encoder_network: nn.Module | None = None, channels_last: bool | None = None) -> None:
        """`perceptual`, `channels_last`: see AutoencoderTask; `encoder_network` replaces the configured
        encoder network (tests use tiny stand-ins)."""
        super().__init__(cfg, perceptual=perceptual, channels_last=channels_last)
        network = encoder_network
        if network is None and perceptual is None and self.perceptual is not None \
                and cfg.loss.perceptual == cfg.model.encoder.network and cfg.model.encoder.weights is None:
            network = self.perceptual.backbone  # one frozen EfficientNet serves the encoder and the loss
        self.modules["tokenizer"] = RAEModel(cfg.model, network, image_size=cfg.image_size)
        self._finish_init()

    def optimizers(self) -> dict[str, OptimSpec]:
        specs = {"ae": OptimSpec(["tokenizer"], self.cfg.optim.ae)}
        if "disc" in self.modules:
            specs["disc"] = OptimSpec(["disc"], self.cfg.optim.disc)
        return specs

    def preview_reconstruction(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x, noise=False).recon

    # -- normalization statistics (docs/methods.md (7.12)) -------------------------------------------------

    def on_start(self, run_dir: Path, resumed: bool) -> None:
        if not self.cfg.norm.enabled or resumed:
            return
        model = unwrap(self.modules["tokenizer"])
        mean, std, images = self.latent_statistics(model)
        model.set_latent_stats(mean.to(model.latent_mean.device), std.to(model.latent_std.device), images)
        if is_main_process():
            record = {"images": images, "split": "train", "eps": self.cfg.norm.eps,
                      "encoder": model.encoder.name, "encoder_checksum": model.encoder.checksum,
                      "mean": mean.tolist(), "std": std.tolist()}
            (Path(run_dir) / STATS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        log.info("latent statistics over %d training images: mean |mu| %.3f, std in [%.3f, %.3f]", images,
                 float(mean.abs().mean()), float(std.min()), float(std.max()))

    @torch.no_grad()
    def latent_statistics(self, model: RAEModel) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(per-channel mean, sqrt(var + eps), images) of the clean encoder output over the first
        `norm.images` training images and all their positions, accumulated in float64."""
        from twostage.tokenizers.run import split_loader

        cfg = self.cfg
        data, loader = split_loader(cfg, "train", cfg.train.batch_size, limit=cfg.norm.images)
        device = model.latent_mean.device
        total = torch.zeros(model.latent_channels, dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        count = 0
        for batch in loader:
            z = model.encode_features(self.prepare(batch, device)).double()
            total += z.sum(dim=(0, 2, 3))
            squares += z.pow(2).sum(dim=(0, 2, 3))
            count += z.shape[0] * z.shape[2] * z.shape[3]
        mean = total / count
        var = (squares / count - mean.pow(2)).clamp_min(0.0)
        return mean.float().cpu(), (var + cfg.norm.eps).sqrt().float().cpu(), len(data)

    # -- the loss (docs/methods.md (7.11)) -----------------------------------------------------------------

    def autoencoder_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lc = self.cfg.loss
        _, out, target = self.forward_autoencoder(ctx)
        recon = out.recon
        diff = recon.float() - target.float()
        pixel = (diff.abs() if lc.pixel == "l1" else diff.pow(2)).mean()
        rec = lc.pixel_weight * pixel
        logs: dict[str, torch.Tensor] = {"pixel": pixel.detach(), "noise_sigma": out.sigma.detach().mean(),
                                         "latent_rms": out.latent.detach().pow(2).mean().sqrt()}
        if self.perceptual is not None and lc.perceptual_weight > 0:
            perc = self.perceptual(recon, target).mean()
            rec = rec + lc.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        loss = rec
        gan = self.generator_adversarial(ctx, recon)
        if gan is not None:
            logs["gan_g"] = gan.detach()
            weight = 1.0
            if lc.adaptive_gan_weight:
                layer = unwrap(ctx.models["tokenizer"]).decoder_last_layer
                weight = adaptive_weights(rec, {"gan": (gan, layer)}, lc.adaptive_max)["gan"]
                logs["gan_adaptive_weight"] = weight
            loss = loss + lc.gan_weight * weight * gan
        return loss, logs


__all__ = ["RAETokenizerTask", "STATS_FILE"]
