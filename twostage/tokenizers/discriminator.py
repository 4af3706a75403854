"""PatchGAN discriminator (pix2pix NLayerDiscriminator layout) and the GAN losses of the VQ recipe.

3 layers, ndf 64 in the published recipe: a 4x4 stride-2 conv stack whose output is a grid of
real/fake logits, one per overlapping patch. Hinge loss for the discriminator, -mean(logits) for the
generator, switched on at `disc_start`; optionally scaled by the adaptive weight
||grad L_rec|| / ||grad L_gan|| taken at the decoder's last layer (taming-transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# The discriminator's normalization layers (taming's PatchGAN uses BatchNorm).
NORMS = {
    "batch": nn.BatchNorm2d,
    "group": lambda channels: nn.GroupNorm(min(32, channels), channels),
    "none": lambda channels: nn.Identity(),
}


def _norm(name: str, channels: int) -> nn.Module:
    if name not in NORMS:
        raise ValueError(f"discriminator norm {name!r}: choose one of {list(NORMS)}")
    return NORMS[name](channels)


class PatchGAN(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1  # the last hidden conv keeps the resolution
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=norm == "none"),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # DCGAN init, as pix2pix / taming.
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake.float()).mean()


D_LOSSES = {"hinge": hinge_d_loss, "non-saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non-saturating": non_saturating_g_loss}


def adaptive_weights(rec_loss: torch.Tensor, terms: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     max_weight: dict[str, float] | float = 1e4) -> dict[str, torch.Tensor]:
    """Adaptive loss weights (taming VQGAN, arXiv:2012.09841 eq. 7; VA-VAE's VF loss, arXiv:2501.01423):

        w_name = clamp(||d rec / d W|| / (||d term / d W|| + 1e-4), 0, max)   for terms {name: (term, W)}

    so each term's gradient at layer W is scaled to the reconstruction's. The reconstruction's
    gradients at all the layers come from one autograd call; weights are detached device tensors
    (no host sync).
    """
    layers = list({id(w): w for _, w in terms.values()}.values())
    rec_grads = torch.autograd.grad(rec_loss, layers, retain_graph=True)
    rec_norm = {id(w): g.float().norm() for w, g in zip(layers, rec_grads)}
    out = {}
    for name, (loss, layer) in terms.items():
        grad = torch.autograd.grad(loss, layer, retain_graph=True)[0]
        cap = max_weight[name] if isinstance(max_weight, dict) else max_weight
        out[name] = (rec_norm[id(layer)] / (grad.float().norm() + 1e-4)).clamp(0.0, cap).detach()
    return out
