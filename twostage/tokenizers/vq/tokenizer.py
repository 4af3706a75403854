"""A trained VQ tokenizer for inference: `Tokenizer.from_pretrained(RUN)`.

    tok = Tokenizer.from_pretrained("runs/vq_f8", device="cuda")
    ids = tok.encode(images)            # (N, h, w) int64, images float [-1, 1] (N, C, H, W)
    images = tok.decode_indices(ids)    # (N, C, H, W) in [-1, 1]

RUN is a training run folder (RUN/config.yaml + RUN/checkpoints/latest -> step_XXXXXXX/). The EMA
weights are used when the checkpoint has them (the engine writes ema.safetensors only with
train.ema_decay), else the raw weights. `checksum` is the sha256 of the weights file actually loaded:
token caches record it so a cache can always be traced to the exact tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from twostage import config as configlib
from twostage.engine import checkpoint as ckpt
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.model import VQModel

MODULE = "tokenizer"  # the key prefix of the tokenizer's weights in checkpoints


class TokenizerLoadError(RuntimeError):
    pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    folder = run_dir / "checkpoints"
    if step is not None:
        path = folder / f"step_{step:07d}"
        if not (path / "model.safetensors").is_file():
            have = ", ".join(p.name for p in ckpt.list_checkpoints(folder)) or "none"
            raise TokenizerLoadError(f"{run_dir} has no checkpoint at step {step} (have: {have})")
        return path
    path = ckpt.latest_checkpoint(folder)
    if path is None:
        raise TokenizerLoadError(
            f"{run_dir} has no checkpoint (expected {folder}/latest and step_XXXXXXX/); "
            "train one with `twostage tokenizer train CONFIG --out RUN`"
        )
    return path


def strip_module_prefix(tensors: dict[str, torch.Tensor], module: str = MODULE) -> dict[str, torch.Tensor]:
    prefix = f"{module}."
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    # tolerate wrapper prefixes from DDP / torch.compile'd modules saved elsewhere
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in out.items()}


class Tokenizer:
    def __init__(self, model: VQModel, config: VQRunConfig, *, checksum: str = "",
                 weights_path: Path | None = None, step: int | None = None) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.config = config
        self.checksum = checksum
        self.weights_path = weights_path
        self.step = step

    # -- loading --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, *, device: str | torch.device = "cpu", step: int | None = None,
                        prefer_ema: bool = True) -> Tokenizer:
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise TokenizerLoadError(f"{run_dir} is not a tokenizer run folder (no config.yaml)")
        cfg = configlib.load(VQRunConfig, config_path)
        path = resolve_checkpoint(run_dir, step)
        weights = path / "ema.safetensors"
        if not (prefer_ema and weights.is_file()):
            weights = path / "model.safetensors"
        from safetensors.torch import load_file

        state = strip_module_prefix(load_file(str(weights)))
        if not state:
            raise TokenizerLoadError(f"{weights} holds no '{MODULE}.*' weights")
        model = VQModel(cfg.model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise TokenizerLoadError(f"{weights} does not match the model in {config_path}: {err}") from None
        step_num = int(ckpt.STEP_DIR.match(path.name).group(1)) if ckpt.STEP_DIR.match(path.name) else None
        return cls(model, cfg, checksum=file_sha256(weights), weights_path=weights, step=step_num).to(device)

    def to(self, device: str | torch.device) -> Tokenizer:
        self.model.to(device)
        return self

    # -- properties -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def codebook_size(self) -> int:
        return self.model.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    @property
    def image_size(self) -> int:
        """The image size it was trained at."""
        return self.config.image_size

    def grid_size(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        return self.model.grid_size(self.image_size if image_size is None else image_size)

    # -- inference ------------------------------------------------------------------------------------

    def _autocast(self, precision: str):
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision != "fp32":
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        return contextlib.nullcontext()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) floats in [-1, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32, non_blocking=True)
        want = self.config.model.in_channels
        if x.shape[1] == 1 and want == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != want:
            raise ValueError(f"images have {x.shape[1]} channels; this tokenizer takes {want}")
        return x

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> code indices (N, h, w) int64 (the lookup itself is always fp32)."""
        with self._autocast(precision):
            return self.model.encode(self._input(images)).indices

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(N, h, w) (or (N, h*w) with a square grid) code indices -> images (N, C, H, W) in [-1, 1]."""
        indices = indices.to(self.device, torch.int64)
        if indices.ndim == 2:
            side = int(round(indices.shape[1] ** 0.5))
            if side * side != indices.shape[1]:
                raise ValueError(f"cannot infer a square grid from {indices.shape[1]} tokens; pass (N, h, w)")
            indices = indices.view(-1, side, side)
        if int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size:
            raise ValueError(f"code indices must lie in [0, {self.codebook_size})")
        with self._autocast(precision):
            return self.model.decode_indices(indices).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        with self._autocast(precision):
            return self.model(self._input(images)).recon.float().clamp(-1, 1)
