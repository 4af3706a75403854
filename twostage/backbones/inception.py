"""The Inception-v3 network of FID (TF graph `inception-2015-12-05`), written here in torch.

FID (Heusel et al. 2017, arXiv:1706.08500) is only comparable across papers with this exact network
(Szegedy et al. 2015, arXiv:1512.00567, as frozen in the 2015 TF graph), so it is rebuilt layer by
layer and loads the published weights; the weights never ship with this package.

It is *not* torchvision's Inception-v3: the FID graph has 1008 output classes, BatchNorm without a
learned scale, and three FID-specific pooling choices that change the features:
- average pools inside the Inception blocks exclude the zero padding (count_include_pad=False),
- the last block (Mixed_7c / mixed_10) uses a *max* pool in its pool branch, the one before it an
  average pool.

Two common weight files load into the same module:
- pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (torchvision parameter names:
  Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_mean, ...);
- the TorchScript archive `inception-2015-12-05.pt` of StyleGAN2-ADA / StyleGAN3 / clean-fid, whose
  parameters are named layers.conv.weight / .beta / .mean / .var, layers.mixed_9.tower_conv.weight,
  ... This module uses that layout natively, so the TorchScript weights load as they are and
  pytorch-fid's names are translated (`from_pytorch_fid_state_dict`).

Preprocessing follows the file's ecosystem (it is part of the protocol, recorded per result):
- "pytorch-fid": [-1,1] -> F.interpolate bilinear (align_corners=False, no antialias) to 299;
- "torchscript": [-1,1] -> [0,255] -> TF1 `resize_bilinear` emulation to 299 -> (x - 128) / 128.
Outputs: pool = 2048-d pool3; spatial = mixed_6/conv first 7 channels, NHWC-flattened, 2023-d (the
sFID features of Nash et al. 2021, arXiv:2103.03841, as the ADM evaluator of Dhariwal & Nichol 2021,
arXiv:2105.05233, takes them); logits = pool3 @ W^T with no output bias (the Inception Score
convention, Salimans et al. 2016, arXiv:1606.03498).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twostage.backbones.base import FeatureNetwork, WeightsMismatchError, WeightsNotFoundError, to_rgb
from twostage.common.hashing import file_sha256

__all__ = ["FIDInceptionV3", "InceptionFeatures", "load_inception", "to_pytorch_fid_state_dict"]

WEIGHTS_HELP = (
    "Inception-v3 FID weights ship with no package and cannot be downloaded here. Download one of\n"
    "  pt_inception-2015-12-05-6726825d.pth (pytorch-fid state dict): "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth\n"
    "  inception-2015-12-05.pt (TorchScript, StyleGAN/clean-fid): "
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt\n"
    "on a machine with internet, copy it here and pass its path (--weights PATH / weights=PATH). "
    "Without it use the offline default, effnet-lite0 (FD-EffNetLite0, not comparable to FID)."
)
SIZE = 299


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm without scale (TF's scale=False; eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, k: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else padding
        self.weight = nn.Parameter(torch.randn(cout, cin, kh, kw) * (2.0 / (cin * kh * kw)) ** 0.5)
        self.beta = nn.Parameter(torch.zeros(cout))
        # running statistics are buffers (never trained); state-dict names match the TorchScript file
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean.to(x.dtype), self.var.to(x.dtype), None,
                         self.beta.to(x.dtype), False, 0.0, 1e-3)
        return F.relu(x)


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))


def _avg3() -> nn.AvgPool2d:
    # FID-specific: padding excluded from the average
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b/5c/5d: 35x35
    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(("conv", ConvBN(cin, 48, 1)), ("conv_1", ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                            ("conv_2", ConvBN(96, 96, 3, padding=1)))
        self.tower_2 = _seq(("pool", _avg3()), ("conv", ConvBN(cin, pool_ch, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                          ("conv_2", ConvBN(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):  # Mixed_6b..6e: 17x17 with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        r, c = (1, 7), (7, 1)  # row / column kernels
        pr, pc = (0, 3), (3, 0)
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, r, padding=pr)),
                          ("conv_2", ConvBN(c7, 192, c, padding=pc)))
        self.tower_1 = _seq(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, c, padding=pc)),
                            ("conv_2", ConvBN(c7, c7, r, padding=pr)),
                            ("conv_3", ConvBN(c7, c7, c, padding=pc)),
                            ("conv_4", ConvBN(c7, 192, r, padding=pr)))
        self.tower_2 = _seq(("pool", _avg3()), ("conv", ConvBN(cin, 192, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.tower = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 192, (1, 7), padding=(0, 3))),
                            ("conv_2", ConvBN(192, 192, (7, 1), padding=(3, 0))),
                            ("conv_3", ConvBN(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):  # Mixed_7b (avg pool branch) / Mixed_7c (max pool branch: FID-specific)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg3()
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def tf_resize_bilinear(x: Tensor, size: int = SIZE) -> Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: output pixel i samples input coordinate
    i * in/out (no half-pixel centres), edges clamped. grid_sample with align_corners=False maps a
    normalised u to pixel ((u+1)W - 1)/2 and affine_grid emits u_i = (2i+1)/out - 1; adding
    1/W - 1/out to u gives exactly i * W/out."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FIDInceptionV3(nn.Module):
    """The bare network. `forward` mirrors the TorchScript file's call convention (images in
    [0, 255], any size; returns pool3 features or class probabilities), so that a scripted copy of
    this module is a stand-in for the real `inception-2015-12-05.pt` in tests."""

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            ("conv", ConvBN(3, 32, 3, stride=2)), ("conv_1", ConvBN(32, 32, 3)),
            ("conv_2", ConvBN(32, 64, 3, padding=1)), ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", ConvBN(64, 80, 1)), ("conv_4", ConvBN(80, 192, 3)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", BlockA(192, 32)), ("mixed_1", BlockA(256, 64)), ("mixed_2", BlockA(288, 64)),
            ("mixed_3", BlockB(288)),
            ("mixed_4", BlockC(768, 128)), ("mixed_5", BlockC(768, 160)),
            ("mixed_6", BlockC(768, 160)), ("mixed_7", BlockC(768, 192)),
            ("mixed_8", BlockD(768)), ("mixed_9", BlockE(1280, max_pool=False)),
            ("mixed_10", BlockE(2048, max_pool=True)),
        )
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        x = tf_resize_bilinear(img.float())
        x = (x - 128.0) / 128.0
        feats = self.layers(x).mean(dim=(2, 3))
        if return_features:
            return feats
        return F.softmax(F.linear(feats, self.output.weight), dim=1)


# --- pytorch-fid (torchvision names) <-> native names --------------------------------------------
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_BLOCKS = {"Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
           "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
           "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
          "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
          "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
          "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
               "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
               "Mixed_7c": "E"}
_PARAM = {"conv.weight": "weight", "bn.bias": "beta", "bn.running_mean": "mean", "bn.running_var": "var"}


def _torchvision_layers() -> dict[str, str]:
    """torchvision layer prefix (e.g. 'Mixed_6d.branch1x1') -> native prefix ('layers.mixed_6.conv')."""
    table = {tv: f"layers.{nat}" for tv, nat in _STEM.items()}
    for tv_block, nat_block in _BLOCKS.items():
        for tv_branch, nat_branch in _BRANCHES[_BLOCK_KIND[tv_block]].items():
            table[f"{tv_block}.{tv_branch}"] = f"layers.{nat_block}.{nat_branch}"
    return table


def from_pytorch_fid_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Translate pytorch-fid names to native ones. The BN scale (gamma; ones in the FID file) has
    no native slot, so it is folded exactly: gamma*(Wx - m)/s + b == (gamma W x - gamma m)/s + b."""
    layers = _torchvision_layers()
    out: dict[str, Tensor] = {}
    for tv, nat in layers.items():
        try:
            w, b = sd[f"{tv}.conv.weight"], sd[f"{tv}.bn.bias"]
            m, v = sd[f"{tv}.bn.running_mean"], sd[f"{tv}.bn.running_var"]
        except KeyError as e:
            raise WeightsMismatchError(f"pytorch-fid Inception state dict lacks {e.args[0]!r}: not an "
                                       f"FID Inception-v3 file?\n{WEIGHTS_HELP}") from None
        g = sd.get(f"{tv}.bn.weight", torch.ones_like(b))
        out[f"{nat}.weight"] = w * g.view(-1, 1, 1, 1)
        out[f"{nat}.beta"], out[f"{nat}.mean"], out[f"{nat}.var"] = b, m * g, v
    out["output.weight"], out["output.bias"] = sd["fc.weight"], sd["fc.bias"]
    return out


def to_pytorch_fid_state_dict(net: FIDInceptionV3) -> dict[str, Tensor]:
    """The inverse translation (gamma = 1): lets tests write a pytorch-fid-format file."""
    sd = net.state_dict()
    out: dict[str, Tensor] = {}
    for tv, nat in _torchvision_layers().items():
        for tv_p, nat_p in _PARAM.items():
            out[f"{tv}.{tv_p}"] = sd[f"{nat}.{nat_p}"].clone()
        out[f"{tv}.bn.weight"] = torch.ones_like(sd[f"{nat}.beta"])
        out[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"], out["fc.bias"] = sd["output.weight"].clone(), sd["output.bias"].clone()
    return out


class InceptionFeatures(FeatureNetwork):
    """`FIDInceptionV3` behind the FeatureNetwork interface, preprocessing as its file's ecosystem does."""

    name = "InceptionV3"
    input_size = SIZE

    def __init__(self, net: FIDInceptionV3, checksum: str, file_format: str):
        super().__init__()
        if file_format not in ("pytorch-fid", "torchscript"):
            raise ValueError(f"unknown Inception file format {file_format!r}")
        self.net = net
        self.checksum = checksum
        self.file_format = file_format
        self.preprocessing = (
            "rgb[-1,1] -> bilinear(align_corners=False, no antialias) 299x299 (pytorch-fid)"
            if file_format == "pytorch-fid"
            else "rgb[-1,1] -> [0,255] -> TF1 resize_bilinear 299x299 -> (x-128)/128 (StyleGAN/clean-fid)"
        )
        self.freeze()

    def _prep(self, images: Tensor, size: int | None = None) -> Tensor:
        x = to_rgb(images)
        size = size or SIZE
        if self.file_format == "pytorch-fid":
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return x
        return (tf_resize_bilinear((x + 1.0) * 127.5, size) - 128.0) / 128.0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        layers = self.net.layers
        x = self._prep(images)
        spatial = None
        for name, layer in layers.named_children():
            if name == "mixed_6":
                # ADM's sFID tensor "mixed_6/conv": the 1x1 branch of mixed_6, first 7 channels
                spatial = layer.conv(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
            x = layer(x)
        pool = x.mean(dim=(2, 3))
        logits = F.linear(pool, self.net.output.weight)  # IS convention: no output bias
        return {"pool": pool, "spatial": spatial, "logits": logits}

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:
        keep = ("conv_2", "conv_4", "mixed_2", "mixed_7", "mixed_10")
        x, maps = self._prep(images, size), []
        for name, layer in self.net.layers.named_children():
            x = layer(x)
            if name in keep:
                maps.append(x)
            if name == keep[-1]:
                break
        return maps


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zip files with a code/ directory; plain torch.save zips have none.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def load_inception(weights: str | os.PathLike | None, check: bool = True) -> InceptionFeatures:
    """Load the FID Inception-v3 from either file format (detected from the file)."""
    if weights is None:
        raise WeightsNotFoundError("inception-v3 needs a weights file.\n" + WEIGHTS_HELP)
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(f"Inception weights file not found: {path}\n{WEIGHTS_HELP}")
    net = FIDInceptionV3()
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the file is one
            warnings.simplefilter("ignore", DeprecationWarning)
            script = torch.jit.load(str(path), map_location="cpu").eval()
        _load(net, dict(script.state_dict()), path)
        if check:
            _check_against_script(net, script, path)
        fmt = "torchscript"
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or "Conv2d_1a_3x3.conv.weight" not in sd:
            raise WeightsMismatchError(f"{path} is neither pytorch-fid's Inception state dict nor a "
                                       f"TorchScript archive.\n{WEIGHTS_HELP}")
        _load(net, from_pytorch_fid_state_dict(sd), path)
        fmt = "pytorch-fid"
    return InceptionFeatures(net, file_sha256(path), fmt)


def _load(net: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Copy every parameter the network has from `sd` (extra entries are ignored), or name the misfit."""
    own = net.state_dict()
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    if bad or missing:
        raise WeightsMismatchError(f"{path}: parameters do not fit the FID Inception-v3 (missing: "
                                   f"{missing[:5]}, shape mismatch: {bad[:5]}).\n{WEIGHTS_HELP}")
    net.load_state_dict({k: sd[k].float() for k in own})


@torch.no_grad()
def _check_against_script(net: FIDInceptionV3, script, path: Path) -> None:
    """Weights copied by name could still be wired differently: compare pool3 features of the file's
    own forward with ours on a fixed probe before trusting them."""
    g = torch.Generator().manual_seed(0)
    probe = torch.rand(2, 3, 64, 80, generator=g) * 255.0
    theirs = script(probe, return_features=True)
    if isinstance(theirs, (tuple, list)):
        theirs = theirs[0]
    ours = net(probe, return_features=True)
    err = (theirs.reshape(ours.shape).float() - ours).abs().max().item()
    scale = ours.abs().max().item() + 1e-6
    if err > 1e-3 * scale:
        raise WeightsMismatchError(f"{path}: the TorchScript network's features differ from the re-built "
                                   f"Inception-v3 (max abs err {err:.3g}); this file is not the FID "
                                   f"Inception.\n{WEIGHTS_HELP}")
