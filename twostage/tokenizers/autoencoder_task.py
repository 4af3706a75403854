"""What every tokenizer's training Task shares: images in, a PatchGAN, a perceptual loss, previews, validation.

A tokenizer kind's Task (twostage/tokenizers/vq/task.py, twostage/tokenizers/kl/task.py) subclasses
`AutoencoderTask` and writes only what differs: its modules and optimizers, and the autoencoder loss
(`autoencoder_loss`). The shared parts:

  phases         "autoencoder" (the kind's loss) then, from `loss.disc_start` on, "discriminator"
                 on the reconstruction the first phase cached (no second decoder pass);
  discriminator  PatchGAN with hinge or non-saturating loss (taming VQGAN, arXiv:2012.09841);
  perceptual     the frozen perceptual network, moved to the training device once and compiled with
                 the rest on CUDA when train.compile is set;
  previews       a fixed batch of training images reconstructed by the EMA weights at each checkpoint
                 (RUN/samples/recon_XXXXXXX.png) with its PSNR;
  validation     with monitor.val_images = N > 0, at each checkpoint the first N images of the val split
                 reconstructed by the EMA weights (the raw ones without train.ema_decay, as the record's
                 "weights" says) and scored as `eval recon` scores a run (its
                 `evaluate_reconstruction`, on the offline feature network): logged as val/psnr,
                 val/ssim, val/rFD-<network> and, for discrete codes, val/codebook_usage and
                 val/codebook_perplexity, and written with the protocol to RUN/val/step_XXXXXXX.json,
                 so that a run shows whether its reconstruction has stopped improving (the study report
                 draws these curves: twostage/study/curves.py). rFD over N < 1280 images (the
                 network's feature size) is biased upward: compare it along one curve, not with the
                 full-split rFD of `eval recon`.
  replicas       K seeds of one config as stacked replicas (twostage/engine/replicas.py ReplicaTask,
                 twostage/tokenizers/run.py train_replicas): `as_replica` puts the task in replica mode,
                 in which its loss runs under torch.func.vmap and so writes no state of the task: no
                 preview capture (each replica keeps its own first training images through
                 `replica_first_batch`, outside vmap), no NHWC re-layout (vmap cannot re-lay a batched
                 tensor), no compile of the perceptual network of its own (ReplicaTask compiles the
                 whole vmapped loss with train.compile); a kind's own state (the VQ codebook-usage
                 window) is skipped too, and codebook usage is reported per replica by validation at
                 checkpoints (val/codebook_usage, with monitor.val_images > 0). Replica 0's frozen
                 networks serve every replica's loss: they are the same pretrained networks in each
                 (loss.lpips_random_init, for benchmarks only, would draw them from each seed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from twostage.common.images import interleave_pairs, psnr, save_grid
from twostage.engine.task import OptimSpec, Phase, PhaseContext, TaskBase, unwrap
from twostage.tokenizers.discriminator import D_LOSSES, G_LOSSES, PatchGAN
from twostage.tokenizers.perceptual import PerceptualLoss, build_perceptual

log = logging.getLogger(__name__)


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


def uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


class AutoencoderTask(TaskBase):
    """Base of the tokenizer Tasks. Subclasses set self.modules["tokenizer"] before calling
    `_finish_init`, and implement `optimizers`, `autoencoder_loss` and `preview_reconstruction`."""

    def __init__(self, cfg: Any, *, perceptual: nn.Module | None = None, channels_last: bool | None = None) -> None:
        """`perceptual` replaces the configured perceptual network: a PerceptualLoss, or a backbone with
        `feature_maps(images, size)` (tests use tiny stand-ins). `channels_last` (default: when training
        compiled on CUDA) stores conv weights and activations NHWC: the fast layout for compiled bf16
        convolutions, but slower in eager mode, where GroupNorm copies NHWC inputs to NCHW (measured on
        an H100 with benchmarks/bench_tokenizer.py)."""
        self.cfg = cfg
        loss = cfg.loss
        if perceptual is not None:
            self.perceptual = perceptual if isinstance(perceptual, PerceptualLoss) else \
                PerceptualLoss(perceptual, size=loss.perceptual_size)
        elif loss.perceptual_weight > 0:
            self.perceptual = build_perceptual(loss.perceptual, weights=loss.lpips_weights, heads=loss.lpips_heads,
                                               random_init=loss.lpips_random_init, size=loss.perceptual_size)
        else:
            self.perceptual = None
        if channels_last is None:
            channels_last = uses_cuda(cfg.train.device) and cfg.train.compile
        self.channels_last = channels_last
        self.modules: dict[str, nn.Module] = {}
        self.frozen: list[nn.Module] = [self.perceptual] if self.perceptual is not None else []
        self._frozen_device: torch.device | None = None
        self._preview: torch.Tensor | None = None  # fixed images for the checkpoint reconstruction grid
        self._val_images: Dataset | None = None  # monitor.val_images of the val split, once looked up
        self._val_looked_up = False
        self._val_network: nn.Module | None = None  # the metric feature network, loaded at the first validation
        self._g_loss, self._d_loss = G_LOSSES[loss.gan_loss], D_LOSSES[loss.gan_loss]
        self.replica_mode = False  # one of K stacked replicas (`as_replica`): the loss runs under vmap

    def _finish_init(self) -> None:
        """Add the discriminator and lay the convolutional modules out NHWC when asked."""
        lc = self.cfg.loss
        if lc.gan_weight > 0:
            self.modules["disc"] = PatchGAN(self.cfg.model.out_channels, lc.disc_channels, lc.disc_layers, lc.disc_norm)
        if self.channels_last:  # NHWC convolutions are the fast path for bf16 on tensor cores
            for name in ("tokenizer", "disc"):
                if name in self.modules:
                    self.modules[name].to(memory_format=torch.channels_last)

    # -- Task protocol --------------------------------------------------------------------------------

    def optimizers(self) -> dict[str, OptimSpec]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        ae = [name for name in self.optimizers() if name != "disc"]
        phases = [Phase("autoencoder", ae, self.autoencoder_loss)]
        if "disc" in self.modules:
            start = self.cfg.loss.disc_start
            phases.append(Phase("discriminator", ["disc"], self.discriminator_loss, active=lambda step: step >= start))
        return phases

    def ema_modules(self) -> list[str]:
        return ["tokenizer"]

    # -- shared pieces of the losses ------------------------------------------------------------------

    def prepare(self, batch: Any, device: torch.device) -> torch.Tensor:
        """The batch's images on the device; grayscale repeated for an RGB tokenizer; NHWC if asked."""
        x = batch_images(batch).to(device, non_blocking=True)
        want = self.cfg.model.in_channels
        if x.shape[1] != want:
            if x.shape[1] == 1 and want == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"images have {x.shape[1]} channels but model.in_channels={want}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._preview is None and not self.replica_mode:  # under vmap x is a batched view: see replica_first_batch
            self._keep_preview(x)
        return x

    def _keep_preview(self, x: torch.Tensor) -> None:
        if self.cfg.monitor.grid_images > 0:
            self._preview = x[: self.cfg.monitor.grid_images].detach().clone()

    def forward_autoencoder(self, ctx: PhaseContext) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """(images, the tokenizer's output, the pixel target): the images go through the tokenizer once,
        and the detached reconstruction is cached for the discriminator phase of the same step."""
        self.frozen_on(ctx.device)
        x = self.prepare(ctx.batch, ctx.device)
        out = ctx.models["tokenizer"](x)
        ctx.scratch["images"], ctx.scratch["recon"] = x, out.recon.detach()
        target = x if out.recon.shape[1] == x.shape[1] else x[:, :1]  # a grayscale decoder of RGB input
        return x, out, target

    def frozen_on(self, device: torch.device) -> None:
        """Move the frozen networks (never checkpointed) to the training device once."""
        if self._frozen_device == device:
            return
        for net in self.frozen:
            net.to(device)
            if self.channels_last:
                net.to(memory_format=torch.channels_last)
        # A replica's perceptual network is compiled as part of ReplicaTask's compiled vmapped loss.
        if self.perceptual is not None and device.type == "cuda" and self.cfg.train.compile and not self.replica_mode:
            self.perceptual.compile(**self.cfg.train.compile_options)
        self._frozen_device = device

    # -- stacked replicas (twostage/engine/replicas.py calls these hooks) -------------------------------

    def as_replica(self) -> None:
        """Make this task one of K stacked replicas (the module docstring's "replicas"): its loss then runs
        under torch.func.vmap, on NCHW tensors, and keeps no state of the task."""
        self.replica_mode = True
        self.channels_last = False  # vmap cannot re-lay a batched tensor NHWC (AutoencoderTask.prepare)

    def replica_first_batch(self, batch: Any, device: torch.device) -> None:
        """This replica's own first micro-batch, outside vmap: the frozen networks move to the device here
        rather than inside the vmapped loss, and its first images become its preview, as in a single run."""
        self.frozen_on(device)
        self._keep_preview(self.prepare(batch, device))

    def generator_adversarial(self, ctx: PhaseContext, recon: torch.Tensor) -> torch.Tensor | None:
        """The generator's GAN term once the discriminator has started, else None."""
        if "disc" not in ctx.models or ctx.step < self.cfg.loss.disc_start:
            return None
        return self._g_loss(ctx.models["disc"](recon))

    def autoencoder_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def discriminator_loss(self, ctx: PhaseContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, recon = ctx.scratch.get("images"), ctx.scratch.get("recon")
        if x is None or recon is None:  # the autoencoder phase did not run on this micro-batch
            x = self.prepare(ctx.batch, ctx.device)
            with torch.no_grad():
                recon = self.preview_reconstruction(ctx.models["tokenizer"], x)
        if recon.shape[1] != x.shape[1]:
            x = x[:, :1]
        disc = ctx.models["disc"]
        logits_real, logits_fake = disc(x.detach()), disc(recon.detach())
        d = self._d_loss(logits_real, logits_fake)
        logs = {"d": d.detach(), "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        return self.cfg.loss.gan_weight * d, logs

    # -- checkpoints ----------------------------------------------------------------------------------

    def preview_reconstruction(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction of x (no sampling, no quantizer randomness)."""
        raise NotImplementedError

    def validation_reconstruction(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the deterministic reconstruction of x, the discrete code ids it went through or None). A kind
        with code ids returns them, and its model has `codebook_size`: validation then reports codebook
        usage over the validation images. Continuous latents return None (their statistic, latent
        uniformity, needs a t-SNE: not cheap enough for every checkpoint)."""
        return self.preview_reconstruction(model, x), None

    @torch.no_grad()
    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> dict[str, float]:
        model = unwrap(ema["tokenizer"])
        was_training = model.training
        model.eval()
        try:
            logs = self._preview_grid(step, Path(run_dir), model)
            if self.cfg.monitor.val_images > 0:
                logs.update(self.validate(step, Path(run_dir), model))
        finally:
            model.train(was_training)
        return logs

    def _preview_grid(self, step: int, run_dir: Path, model: nn.Module) -> dict[str, float]:
        if self._preview is None:
            return {}
        x = self._preview.to(next(model.parameters()).device)
        recon = self.preview_reconstruction(model, x).float().clamp(-1, 1)
        target = x if recon.shape[1] == x.shape[1] else x[:, :1]
        grid, nrow = interleave_pairs(target.float().cpu(), recon.cpu())
        save_grid(grid, run_dir / "samples" / f"recon_{step:07d}.png", nrow=nrow)
        return {"tokenizer/preview_psnr": float(psnr(recon, target).mean())}

    @torch.no_grad()
    def validate(self, step: int, run_dir: Path, model: nn.Module) -> dict[str, float]:
        """Score `model` (in eval mode) on the validation images; returns the val/* logs and writes them
        with their protocol to RUN/val/step_XXXXXXX.json. {} when the data has no val split."""
        from twostage.backbones import load_feature_network
        from twostage.engine.run_files import write_val_record
        from twostage.metrics.latent import codebook_usage
        from twostage.metrics.protocol import metric_name
        from twostage.metrics.reconstruction import evaluate_reconstruction

        data = self._validation_images()
        if data is None:
            return {}
        if self._val_network is None:
            self._val_network = load_feature_network()  # the offline default, as `eval recon`
        device = next(model.parameters()).device
        ids: list[torch.Tensor] = []

        def reconstruct(images: torch.Tensor) -> torch.Tensor:
            recon, codes = self.validation_reconstruction(model, self.prepare(images, device))
            if codes is not None:
                ids.append(codes.cpu())
            return recon.float()

        d = self.cfg.data
        weights = "ema" if self.cfg.train.ema_decay else "raw"
        metrics, proto = evaluate_reconstruction(
            reconstruct, data, self._val_network, batch_size=self.cfg.train.batch_size, device=device,
            perceptual=False, progress=False,
            reference=f"{d.name}:val, first {len(data)} images: reconstructions vs the same images "
                      f"({d.image_size}px, {d.resize})",
            protocol={"tokenizer_step": step, "tokenizer_weights": weights},
        )
        rfd = metric_name("rfd", self._val_network.name)
        values = {"psnr": metrics["PSNR"], "ssim": metrics["SSIM"], rfd: metrics[rfd]}
        if ids:
            usage = codebook_usage(torch.cat(ids), model.codebook_size)
            values.update(codebook_usage=usage["usage"], codebook_perplexity=usage["perplexity"])
        write_val_record(run_dir, step, {**values, "weights": weights, "protocol": proto.to_dict()})
        return {f"val/{k}": v for k, v in values.items()}

    def _validation_images(self) -> Dataset | None:
        """The first monitor.val_images images of the run's val split, built as `eval recon` builds them
        (twostage/tokenizers/run.py split_loader: never augmented), once; None, with one warning, when
        the data has no val split or the reconstructions cannot be compared with the images."""
        if not self._val_looked_up:
            self._val_looked_up = True
            self._val_images = self._load_validation_images()
        return self._val_images

    def _load_validation_images(self) -> Dataset | None:
        from twostage.data.errors import DataError
        from twostage.tokenizers.run import split_loader

        n, cfg = self.cfg.monitor.val_images, self.cfg
        if cfg.model.out_channels != cfg.data.channels:
            log.warning("monitor.val_images=%d: no validation at checkpoints: the decoder makes %d-channel images "
                        "of %d-channel data, which the reconstruction metrics cannot compare",
                        n, cfg.model.out_channels, cfg.data.channels)
            return None
        try:
            data, _ = split_loader(cfg, "val", cfg.train.batch_size, limit=n)
        except DataError as err:
            log.warning("monitor.val_images=%d: no validation at checkpoints: %s", n, err)
            return None
        if len(data) < 2:
            log.warning("monitor.val_images=%d: no validation at checkpoints: the val split has %d image(s), "
                        "an FD needs at least 2", n, len(data))
            return None
        return data


__all__ = ["AutoencoderTask", "batch_images", "uses_cuda"]
