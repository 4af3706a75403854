"""VA-VAE's vision-foundation (VF) alignment loss (VA-VAE arXiv:2501.01423; docs/methods.md (6.4)-(6.6)).

A frozen feature network gives patch features f on the latent grid; a trainable 1x1 convolution
without bias projects the latent, z' = W z, to the feature width. With ^ meaning l2-normalized over
channels and i, j positions of one image:

    L_mcos = mean_i      ReLU(1 - m1 - cos(z'_i, f_i))                       m1 = 0.5
    L_mdms = mean_{i,j}  ReLU(| <z^_i, z^_j> - <f^_i, f^_j> | - m2)          m2 = 0.25
    L_vf   = distmat_weight * L_mdms + cos_weight * L_mcos

The margins make the loss exactly zero once the latent is "aligned enough", so it stops pulling the
latent away from what reconstruction needs. The distance matrix is taken on z' as in the public code
(option: on z itself). The adaptive weight that scales L_vf lives in kl_task.py.

`FoundationFeatures` adapts any network with the evaluation feature networks' interface
(`feature_maps(images in [-1, 1], size) -> list[(N, C, h, w)]`, twostage/backbones/base.py) to the
latent grid: it picks one map (default for EfficientNet-Lite0: the stride-16 map, index 3, 112
channels, the deepest one that is not coarser than an f16 latent; for DINOv2 and others: the last map),
feeds images at grid x stride pixels so that the map lands on the grid (DINOv2/14 on a 16x16 grid:
224 px, the paper's input), and resamples (area for shrinking, bilinear for growing) if it still differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# feature_maps index per network name: the map that VF aligns with by default.
DEFAULT_LAYER = {"EffNetLite0": 3}


def vf_loss(z_proj: torch.Tensor, feats: torch.Tensor, *, z: torch.Tensor | None = None, cos_margin: float = 0.5,
            distmat_margin: float = 0.25, cos_weight: float = 1.0, distmat_weight: float = 1.0,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(L_vf, {"vf_mcos", "vf_mdms", "vf_cos"}) for z' and f of shape (N, D, h, w).

    z: the latent whose distance matrix is compared (default z_proj, as the public code); float32.
    """
    if z_proj.shape != feats.shape:
        raise ValueError(f"projected latent {tuple(z_proj.shape)} and features {tuple(feats.shape)} differ")
    zp, f = z_proj.float(), feats.float()
    cos = F.cosine_similarity(zp, f, dim=1)  # (N, h, w)
    mcos = F.relu(1.0 - cos_margin - cos).mean()
    zs = (zp if z is None else z.float()).flatten(2)  # (N, D, hw)
    zn, fn = F.normalize(zs, dim=1), F.normalize(f.flatten(2), dim=1)
    gram_z = torch.bmm(zn.transpose(1, 2), zn)  # (N, hw, hw) cosine similarities between positions
    gram_f = torch.bmm(fn.transpose(1, 2), fn)
    mdms = F.relu((gram_z - gram_f).abs() - distmat_margin).mean()
    loss = distmat_weight * mdms + cos_weight * mcos
    return loss, {"vf_mcos": mcos.detach(), "vf_mdms": mdms.detach(), "vf_cos": cos.detach().mean()}


def resample_to(maps: torch.Tensor, grid: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """(N, C, h', w') -> (N, C, *grid): area averaging when shrinking (if chosen), else bilinear."""
    if tuple(maps.shape[-2:]) == tuple(grid):
        return maps
    shrinking = maps.shape[-2] >= grid[0] and maps.shape[-1] >= grid[1]
    if mode == "area" and shrinking:
        return F.adaptive_avg_pool2d(maps, grid)
    return F.interpolate(maps, size=grid, mode="bilinear", align_corners=False, antialias=shrinking)


class FoundationFeatures(nn.Module):
    """Frozen features of `network` on a latent grid: forward(images, grid) -> (N, C, h, w) float32."""

    def __init__(self, network: nn.Module, layer: int | None = None, input_size: int | None = None,
                 resample: str = "area") -> None:
        super().__init__()
        self.network = network
        self.network.requires_grad_(False)
        self.layer = DEFAULT_LAYER.get(getattr(network, "name", ""), -1) if layer is None else layer
        self.input_size, self.resample = input_size, resample
        # One probe forward tells the chosen map's width and stride, for any network with the interface.
        probe = int(getattr(network, "input_size", 224))
        with torch.no_grad():
            maps = network.feature_maps(torch.zeros(1, 3, probe, probe), probe)
        if not -len(maps) <= self.layer < len(maps):
            raise ValueError(f"vf.layer={self.layer} but {getattr(network, 'name', 'the network')} has "
                             f"{len(maps)} feature maps")
        chosen = maps[self.layer]
        self.channels = int(chosen.shape[1])
        self.stride = probe / chosen.shape[-1]

    def train(self, mode: bool = True) -> FoundationFeatures:  # noqa: ARG002 - frozen on purpose
        return super().train(False)

    def size_for(self, grid: tuple[int, int]) -> int:
        return self.input_size or max(1, round(max(grid) * self.stride))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        maps = self.network.feature_maps(images, self.size_for(grid))[self.layer]
        return resample_to(maps.float(), tuple(grid), self.resample)


def build_foundation(network: str = "effnet-lite0", weights=None, **kw) -> FoundationFeatures:
    """effnet-lite0 (offline default) or dinov2 (local weights), via twostage.backbones.load_feature_network."""
    from twostage.backbones import load_feature_network

    return FoundationFeatures(load_feature_network(network, None if weights is None else str(weights)), **kw)


__all__ = ["vf_loss", "resample_to", "FoundationFeatures", "build_foundation", "DEFAULT_LAYER"]
