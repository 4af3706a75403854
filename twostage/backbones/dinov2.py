"""DINOv2 ViT-*/14 (Oquab et al. 2023, arXiv:2304.07193) as a feature network, from a local weights file.

Why DINOv2: its self-supervised features rank generative models closer to human judgement than
Inception's (Stein et al. 2023, arXiv:2306.04675: FD-DINOv2), and VA-VAE aligns its latents with them
(Yao et al. 2025, arXiv:2501.01423).

Why not timm: timm (>= 1.0) hard-imports torchvision, which has no wheel matching the local CPU torch
build, so the ViT is written here (it is a plain pre-norm ViT with LayerScale). It reads
- the official checkpoints `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` (facebookresearch/dinov2),
- timm's `vit_*_patch14[_reg4]_dinov2` state dicts (.pth/.bin or .safetensors),
and infers the variant (width, depth, registers, MLP kind) from the tensors.

Protocol: rgb[-1,1] -> bicubic antialiased resize to 224 -> ImageNet mean/std; position embeddings
(trained at 518 = 37x37 patches) are resized bicubically with DINOv2's +0.1 scale-factor offset.
- pool:    final-norm CLS token (the DINOv2 feature of "FD-DINOv2", Stein et al. 2023)
- spatial: final-norm patch tokens, first 8 channels, NHWC-flattened (16*16*8 = 2048-d)
- feature_maps: patch-token maps (N, D, 16, 16) after 4 evenly spaced blocks
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twostage.backbones.base import FeatureNetwork, WeightsMismatchError, WeightsNotFoundError, resize_square, to_rgb
from twostage.common.hashing import file_sha256

__all__ = ["DINOv2ViT", "DINOv2Features", "load_dinov2"]

WEIGHTS_HELP = (
    "DINOv2 weights ship with no package and cannot be downloaded here. Download e.g. "
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth (ViT-L/14, "
    "the VA-VAE choice) or the timm checkpoint of vit_large_patch14_dinov2.lvd142m elsewhere, copy "
    "it here and pass its path (--weights PATH / weights=PATH)."
)
_VARIANTS = {384: "ViT-S14", 768: "ViT-B14", 1024: "ViT-L14", 1536: "ViT-G14"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
    """Pre-norm transformer block (Dosovitskiy et al. 2020, arXiv:2010.11929) with LayerScale
    (Touvron et al. 2021, arXiv:2103.17239): x + gamma * f(norm(x)); ViT-g uses a SwiGLU MLP
    (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, heads: int, hidden: int, swiglu: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.full((dim,), 1e-5))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.swiglu = swiglu
        if swiglu:  # ViT-g: SiLU-gated MLP, the two input projections packed in one matrix
            self.mlp.w12 = nn.Linear(dim, 2 * hidden)
            self.mlp.w3 = nn.Linear(hidden, dim)
        else:
            self.mlp.fc1 = nn.Linear(dim, hidden)
            self.mlp.fc2 = nn.Linear(hidden, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.ls1.gamma * self.attn.proj(a)
        h = self.norm2(x)
        if self.swiglu:
            h1, h2 = self.mlp.w12(h).chunk(2, dim=-1)
            h = self.mlp.w3(F.silu(h1) * h2)
        else:
            h = self.mlp.fc2(F.gelu(self.mlp.fc1(h)))
        return x + self.ls2.gamma * h


class DINOv2ViT(nn.Module):
    """The DINOv2 ViT; parameter names follow the official checkpoints. `registers` > 0 adds the
    register tokens of the *_reg4 models (Darcet et al. 2023, arXiv:2309.16588)."""

    def __init__(self, dim: int = 1024, depth: int = 24, registers: int = 0, pos_grid: int = 37,
                 hidden: int | None = None, swiglu: bool = False, patch: int = 14):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + pos_grid * pos_grid, dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, registers, dim) * 0.02) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; present in files
        self.blocks = nn.ModuleList(Block(dim, dim // 64, hidden or 4 * dim, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.registers = registers

    def _pos(self, gh: int, gw: int) -> Tensor:
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(round(grid.shape[1] ** 0.5))
        if (gh, gw) == (m, m):
            return self.pos_embed
        g = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        # DINOv2's own interpolation: scale factor with a +0.1 offset (avoids floor rounding errors)
        g = F.interpolate(g.float(), scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic",
                          align_corners=False)
        g = g[..., :gh, :gw].to(grid.dtype)
        return torch.cat([cls_pos, g.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)

    def tokens(self, x: Tensor, keep: set[int] = frozenset()) -> tuple[Tensor, dict[int, Tensor]]:
        """x normalised (N,3,H,W) -> final-norm tokens [cls, registers, patches] and kept block outputs."""
        n, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(n, -1, -1), t], dim=1) + self._pos(gh, gw)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(n, -1, -1), t[:, 1:]], dim=1)
        kept = {}
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in keep:
                kept[i] = t
        return self.norm(t), kept


def _normalise_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm / chunked / prefixed checkpoints -> official names."""
    sd = {re.sub(r"^(module\.|backbone\.|model\.)", "", k): v for k, v in sd.items()}
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k) if re.match(r"^blocks\.\d+\.\d+\.", k)
          else k: v for k, v in sd.items()}  # block_chunks > 0 layout
    if "reg_token" in sd:  # timm register variant: no_embed_class (cls already carries its position)
        sd["register_tokens"] = sd.pop("reg_token")
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    dim = sd["cls_token"].shape[-1]
    packed = dim == 1536 and "blocks.0.mlp.fc1.weight" in sd  # timm's SwiGLUPacked for ViT-g
    if packed:
        sd = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in sd.items()}
    sd.setdefault("mask_token", torch.zeros(1, dim))
    return sd


class DINOv2Features(FeatureNetwork):
    """`DINOv2ViT` behind the FeatureNetwork interface (protocol in the module docstring)."""

    input_size = 224
    spatial_channels = 8
    preprocessing = ("rgb[-1,1] -> bicubic(antialias) 224x224 -> ImageNet mean/std; "
                     "pos-embed bicubic (DINOv2 +0.1 offset)")

    def __init__(self, vit: DINOv2ViT, checksum: str, variant: str):
        super().__init__()
        self.vit = vit
        self.checksum = checksum
        self.name = f"DINOv2-{variant}"
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        depth = len(vit.blocks)
        self._map_blocks = sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)})
        self.freeze()

    def _prep(self, images: Tensor, size: int | None) -> Tensor:
        size = size or self.input_size
        size = max(self.vit.patch, size // self.vit.patch * self.vit.patch)
        x = resize_square(to_rgb(images), size, mode="bicubic")
        return ((x + 1.0) * 0.5 - self._mean) / self._std

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self._prep(images, None)
        t, _ = self.vit.tokens(x)
        patches = t[:, 1 + self.vit.registers :]
        return {"pool": t[:, 0], "spatial": patches[..., : self.spatial_channels].flatten(1)}

    def feature_maps(self, images: Tensor, size: int | None = None) -> list[Tensor]:
        x = self._prep(images, size)
        gh, gw = x.shape[-2] // self.vit.patch, x.shape[-1] // self.vit.patch
        _, kept = self.vit.tokens(x, set(self._map_blocks))
        skip = 1 + self.vit.registers
        return [kept[i][:, skip:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw) for i in self._map_blocks]


def load_dinov2(weights: str | os.PathLike | None) -> DINOv2Features:
    """Build the ViT that the checkpoint describes (width, depth, registers, MLP kind) and load it."""
    if weights is None:
        raise WeightsNotFoundError("dinov2 needs a weights file.\n" + WEIGHTS_HELP)
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(f"DINOv2 weights file not found: {path}\n{WEIGHTS_HELP}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not any(k.endswith("cls_token") for k in sd):
        raise WeightsMismatchError(f"{path} does not look like a DINOv2 ViT checkpoint (no cls_token)."
                                   f"\n{WEIGHTS_HELP}")
    sd = _normalise_keys(sd)
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    pos_grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    vit = DINOv2ViT(dim, depth, registers, pos_grid, hidden, swiglu, patch)
    missing, unexpected = vit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("head", "fc_norm"))]
    if missing or unexpected:
        raise WeightsMismatchError(f"{path}: DINOv2 checkpoint does not fit (missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]})\n{WEIGHTS_HELP}")
    variant = _VARIANTS.get(dim, f"ViT-{dim}d{patch}") + (f"-reg{registers}" if registers else "")
    return DINOv2Features(vit, file_sha256(path), variant)
