"""Perceptual loss with a pluggable backbone.

Every backbone exposes `feature_maps(images in [-1, 1], size) -> list[(N, C, h, w)]`, differentiable
w.r.t. the images. The distance is LPIPS-style:

    d(x, y) = sum_layers mean_hw sum_c w_c * (u(f(x)) - u(f(y)))^2,   u = unit-normalize over channels

with w_c = 1 for plain feature networks (the offline default, EfficientNet-Lite0 ImageNet weights from
`twostage.metrics.features`) and w_c the learned LPIPS linear heads for LPIPS-VGG16.

LPIPS-VGG16 is implemented here (VGG16 conv trunk + 5 linear heads) and loads user-given local weights:
the trunk from a torchvision `vgg16` state dict ("features.N.*") or a full LPIPS state dict
("net.sliceK.N.*"), the heads from the `lpips` package's `vgg.pth` ("linK.model.1.weight"), in one file
or two. `random_init=True` builds it untrained, for throughput benchmarks only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twostage.config import ConfigError

# VGG16 "D" configuration, laid out with torchvision's `features` indices so its state dict loads as is.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"perceptual weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LPIPSVGG(nn.Module):
    """LPIPS with the VGG16 backbone (frozen). `feature_maps` returns the 5 relu taps."""

    def __init__(self, weights: str | Path | None = None, heads: str | Path | None = None,
                 random_init: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU(inplace=True)]
                cin = item
        self.features = nn.Sequential(*layers)  # indices 0..29, as torchvision's vgg16().features[:30]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        # LPIPS input scaling for [-1, 1] images.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.checksum = "random-init"
        if weights is None and not random_init:
            raise ConfigError(
                "LPIPS-VGG16 needs local weights: set loss.lpips_weights=PATH (torchvision vgg16 state dict "
                "or a full LPIPS state dict) and loss.lpips_heads=PATH (the lpips package's vgg.pth) unless "
                "the first file has the heads; or use loss.perceptual=effnet-lite0 (offline default)"
            )
        if weights is not None:
            self._load(Path(weights), Path(heads) if heads is not None else None)
        else:
            with torch.no_grad():  # LPIPS heads are non-negative; keep that property untrained too
                for lin in self.lins:
                    lin.weight.abs_().mul_(0.1)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSVGG:  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    def _load(self, weights: Path, heads: Path | None) -> None:
        state = _load_state(weights)
        trunk: dict[str, torch.Tensor] = {}
        lins: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if m := re.fullmatch(r"(?:net\.)?features\.(\d+)\.(weight|bias)", key):
                idx = int(m.group(1))
            elif m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
                idx = int(m.group(1))
            elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
                lins[f"{m.group(1)}.weight"] = value
                continue
            else:
                continue  # classifier.*, scaling_layer.* and other extras
            if idx < len(self.features):
                trunk[f"{idx}.{m.group(2)}"] = value
        if heads is not None:
            for key, value in _load_state(heads).items():
                if m := re.fullmatch(r"(?:module\.)?lin(\d)\.model\.1\.weight", key):
                    lins[f"{m.group(1)}.weight"] = value
        try:
            self.features.load_state_dict(trunk, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"{weights} does not hold a VGG16 feature trunk: {err}") from None
        if len(lins) != len(self.lins):
            raise ConfigError(
                f"LPIPS linear heads not found (got {len(lins)} of 5): give loss.lpips_heads=PATH to the "
                "lpips package's weights/v0.1/vgg.pth"
            )
        self.lins.load_state_dict(lins, strict=True)
        self.checksum = _sha256(weights) + (f"+{_sha256(heads)}" if heads else "")

    def feature_maps(self, images: torch.Tensor, size: int | None = None) -> list[torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if size is not None and images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (images - self.shift.to(images.dtype)) / self.scale.to(images.dtype)
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                maps.append(x)
                if i == _TAPS[-1]:
                    break
        return maps

    def layer_weights(self) -> list[torch.Tensor]:
        return [lin.weight for lin in self.lins]


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """Per-image LPIPS-style distance (N,) between `x` (gets gradients) and the target `y`."""

    def __init__(self, backbone: nn.Module, size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.size = size
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # noqa: ARG002 - the backbone stays frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the target side needs no backward: cheaper than one 2N batch
            target_maps = self.backbone.feature_maps(y, self.size)
        maps = self.backbone.feature_maps(x, self.size)
        weights = self.backbone.layer_weights() if hasattr(self.backbone, "layer_weights") else None
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, (a, b) in enumerate(zip(maps, target_maps)):
            # float32: squared unit-vector differences are small and bf16 would round them away.
            diff = (_unit(a.float()) - _unit(b.float())).pow(2)
            if weights is not None:
                per_pos = F.conv2d(diff, weights[i].float())  # (N, 1, h, w) weighted channel sum
            else:
                per_pos = diff.sum(dim=1, keepdim=True)
            total = total + per_pos.mean(dim=(1, 2, 3))
        return total


def build_perceptual(kind: str, *, weights: str | Path | None = None, heads: str | Path | None = None,
                     random_init: bool = False, size: int | None = None) -> PerceptualLoss | None:
    """kind: "effnet-lite0" (offline default), "lpips-vgg" (local weights or random_init), "none"."""
    if kind == "none":
        return None
    if kind == "effnet-lite0":
        from twostage.metrics.features import load_feature_network

        return PerceptualLoss(load_feature_network("effnet-lite0"), size=size)
    if kind == "lpips-vgg":
        return PerceptualLoss(LPIPSVGG(weights, heads, random_init=random_init), size=size)
    raise ConfigError(f"loss.perceptual={kind!r}: choose effnet-lite0, lpips-vgg or none")
