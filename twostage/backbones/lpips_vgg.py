"""LPIPS-VGG16 (Zhang et al. 2018, arXiv:1801.03924): VGG16 conv trunk + 5 learned linear heads, frozen.

LPIPS is the usual perceptual loss of VQGAN-style tokenizers. Its distance (computed by the loss,
twostage/tokenizers/perceptual.py) weights the channels of each relu tap with the heads' weights w_c;
this module only provides the taps and the heads.

Why written here: torchvision (where the `vgg16` architecture lives) has no wheel matching the local
torch build, and the `lpips` package downloads weights. The trunk follows the VGG16 "D" configuration
(Simonyan & Zisserman 2014, arXiv:1409.1556), laid out with torchvision's `features` indices so that
its state dicts load as they are. Local weights only:
- the trunk from a torchvision `vgg16` state dict ("features.N.*") or a full LPIPS state dict
  ("net.sliceK.N.*"),
- the heads from the `lpips` package's `weights/v0.1/vgg.pth` ("linK.model.1.weight"), in the trunk
  file or a second one.
`random_init=True` builds it untrained, for throughput benchmarks only.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from twostage.backbones.base import FrozenNetwork, WeightsMismatchError, WeightsNotFoundError, resize_square, to_rgb
from twostage.common.hashing import file_sha256

__all__ = ["LPIPSVGG"]

# VGG16 "D" configuration, laid out with torchvision's `features` indices so its state dict loads as is.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)
WEIGHTS_HELP = (
    "LPIPS-VGG16 needs local weights: pass weights=PATH (in a tokenizer config loss.lpips_weights=PATH), a "
    "torchvision vgg16 state dict or a full LPIPS state dict, and heads=PATH (loss.lpips_heads=PATH), the "
    "lpips package's weights/v0.1/vgg.pth, unless the first file has the heads; or use the offline default "
    "effnet-lite0 (loss.perceptual=effnet-lite0)"
)


def _load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or torch.save files (also {"state_dict": ...} checkpoints)."""
    if not path.is_file():
        raise WeightsNotFoundError(f"perceptual weights file not found: {path}\n{WEIGHTS_HELP}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _split_trunk_and_heads(state: dict[str, Tensor], trunk_len: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Trunk parameters ("<index>.<weight|bias>") and head weights ("<k>.weight") of either file layout;
    extras (classifier.*, scaling_layer.*, ...) are dropped."""
    trunk: dict[str, Tensor] = {}
    lins: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
            lins[f"{m.group(1)}.weight"] = value
            continue
        m = re.fullmatch(r"(?:net\.)?features\.(\d+)\.(weight|bias)", key) or \
            re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key)
        if m and int(m.group(1)) < trunk_len:
            trunk[f"{int(m.group(1))}.{m.group(2)}"] = value
    return trunk, lins


class LPIPSVGG(FrozenNetwork):
    """LPIPS with the VGG16 backbone. `feature_maps` returns the 5 relu taps; `layer_weights` the heads."""

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
            raise WeightsNotFoundError(WEIGHTS_HELP)
        if weights is not None:
            self._load(Path(weights), Path(heads) if heads is not None else None)
        else:
            with torch.no_grad():  # LPIPS heads are non-negative; keep that property untrained too
                for lin in self.lins:
                    lin.weight.abs_().mul_(0.1)
        self.freeze()

    def _load(self, weights: Path, heads: Path | None) -> None:
        trunk, lins = _split_trunk_and_heads(_load_state(weights), len(self.features))
        if heads is not None:
            lins |= _split_trunk_and_heads(_load_state(heads), 0)[1]
        try:
            self.features.load_state_dict(trunk, strict=True)
        except RuntimeError as err:
            raise WeightsMismatchError(
                f"{weights} does not hold a VGG16 feature trunk: {err}\n{WEIGHTS_HELP}") from None
        if len(lins) != len(self.lins):
            raise WeightsMismatchError(
                f"LPIPS linear heads not found (got {len(lins)} of 5): give loss.lpips_heads=PATH to the "
                "lpips package's weights/v0.1/vgg.pth"
            )
        self.lins.load_state_dict(lins, strict=True)
        self.checksum = file_sha256(weights) + (f"+{file_sha256(heads)}" if heads else "")

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:
        """The relu1_2 .. relu5_3 maps; `size` resizes first (None: the images' own size)."""
        images = to_rgb(images)
        if size is not None:
            images = resize_square(images, size)
        x = (images - self.shift.to(images.dtype)) / self.scale.to(images.dtype)
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                maps.append(x)
                if i == _TAPS[-1]:
                    break
        return maps

    def layer_weights(self) -> list[Tensor]:
        return [lin.weight for lin in self.lins]
