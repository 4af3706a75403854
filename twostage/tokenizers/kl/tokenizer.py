"""A trained KL-VAE for inference: `KLTokenizer.from_pretrained(RUN)`.

    tok = KLTokenizer.from_pretrained("runs/kl_f16d32", device="cuda")
    z = tok.encode(images)           # (N, d, h, w) float32 posterior means, images in [-1, 1] (N, C, H, W)
    images = tok.decode(z)           # (N, C, H, W) in [-1, 1]

Same run-folder layout, EMA preference and weights checksum as the VQ `Tokenizer`
(twostage/tokenizers/vq/tokenizer.py), whose loading helpers it reuses; latent caches record the checksum.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from twostage import config as configlib
from twostage.engine import checkpoint as ckpt
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel
from twostage.tokenizers.vq.tokenizer import TokenizerLoadError, file_sha256, resolve_checkpoint, strip_module_prefix

MODULE = "tokenizer"


def is_kl_run(run_dir: str | Path) -> bool:
    """Whether a tokenizer run folder holds a KL-VAE (its config says kind: kl)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    return path.is_file() and (yaml.safe_load(path.read_text()) or {}).get("kind") == "kl"


class KLTokenizer:
    def __init__(self, model: KLModel, config: KLRunConfig, *, checksum: str = "", weights_path: Path | None = None,
                 step: int | None = None) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.config = config
        self.checksum = checksum
        self.weights_path = weights_path
        self.step = step

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, *, device: str | torch.device = "cpu", step: int | None = None,
                        prefer_ema: bool = True) -> KLTokenizer:
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise TokenizerLoadError(f"{run_dir} is not a tokenizer run folder (no config.yaml)")
        if not is_kl_run(run_dir):
            raise TokenizerLoadError(f"{run_dir} is not a KL-VAE run (its config.yaml has no kind: kl)")
        cfg = configlib.load(KLRunConfig, config_path)
        path = resolve_checkpoint(run_dir, step)
        weights = path / "ema.safetensors"
        if not (prefer_ema and weights.is_file()):
            weights = path / "model.safetensors"
        from safetensors.torch import load_file

        state = strip_module_prefix(load_file(str(weights)), MODULE)
        if not state:
            raise TokenizerLoadError(f"{weights} holds no '{MODULE}.*' weights")
        model = KLModel(cfg.model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise TokenizerLoadError(f"{weights} does not match the model in {config_path}: {err}") from None
        match = ckpt.STEP_DIR.match(path.name)
        return cls(model, cfg, checksum=file_sha256(weights), weights_path=weights,
                   step=int(match.group(1)) if match else None).to(device)

    def to(self, device: str | torch.device) -> KLTokenizer:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def grid_size(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        return self.model.grid_size(self.image_size if image_size is None else image_size)

    def _autocast(self, precision: str):
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision != "fp32":
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        return contextlib.nullcontext()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] on the device, grayscale repeated for an RGB model."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) floats in [-1, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32, non_blocking=True)
        want = self.config.model.in_channels
        if x.shape[1] == 1 and want == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != want:
            raise ValueError(f"images have {x.shape[1]} channels; this tokenizer takes {want}")
        return x

    _input = prepare  # the name the VQ Tokenizer uses (shared CLI code calls it)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32", sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (N, d, h, w) float32: the posterior mean, or a sample of it with sample=True."""
        with self._autocast(precision):
            posterior = self.model.encode(self.prepare(images))
        return (posterior.sample(generator) if sample else posterior.mode()).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, d, h, w) latents (not normalized) -> images (N, C, H, W) in [-1, 1]."""
        z = latents.to(self.device, torch.float32)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (N, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        with self._autocast(precision):
            return self.model.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with self._autocast(precision):
            return self.model(self.prepare(images), sample=False).recon.float().clamp(-1, 1)


__all__ = ["KLTokenizer", "is_kl_run"]
