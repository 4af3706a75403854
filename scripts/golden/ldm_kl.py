"""Golden outputs of LDM's and VA-VAE's own KL autoencoders, for tests/test_convert_kl.py.

    python scripts/golden/ldm_kl.py LDM_GIT LIGHTNINGDIT_GIT [--ldm-rev HEAD] [--lightningdit-rev HEAD] \
        [--out tests/golden]

LDM_GIT is a git directory of CompVis/latent-diffusion, LIGHTNINGDIT_GIT one of hustvl/LightningDiT (clones,
or bare mirrors). The script takes the peers' files at the given revisions out of them (scripts/golden/peer.py)
and imports them as they are: latent-diffusion's ldm/models/autoencoder.py (AutoencoderKL) with the modules
it imports, and LightningDiT's tokenizer/autoencoder.py (the AutoencoderKL that tokenizer/vavae.py loads
VA-VAE into). They need torch, numpy, einops and PIL; the training-only imports of the LDM file
(pytorch_lightning's LightningModule, taming's VectorQuantizer2, both unused by AutoencoderKL's encode /
decode) and LightningDiT's torchvision import (its image transforms) are stood in for by empty modules, and
the loss is an nn.Identity (its `loss.*` tensors are training-only and dropped by the converter).

Three layouts, each at base width 32 (the published models have 128; LDM's GroupNorm of 32 groups puts a
floor on the width):
  ldm_kl_f8      Stable Diffusion's VAE (LDM kl-f8): ch_mult 1,2,4,4, no level attention, z 4
  ldm_kl_f32     LDM kl-f32: ch_mult 1,1,2,2,4,4, attention at the 16 and 8 px levels of 256 px, z 64
  vavae_f16d32   VA-VAE f16d32 (LightningDiT): ch_mult 1,1,2,2,4, attention at 16 px, z 32
Each is filled deterministically and runs 4 images of 32x32 in float64, so the reference carries no float32
rounding of its own. It writes tests/golden/<layout>.safetensors with the images (float32), the posterior's
mean and (clamped) log-variance, and the images decoded from the mean (decode(posterior.mode())), all float64,
and in the metadata the peer file and commit, the architecture, the state dict's key layout and the sha256 of
the weights; it prints the commits.

The weights themselves (up to 9.5M values) are not stored: they come from the tests' `golden_tensor` fill
(tests/test_convert_llamagen_vq.py), a pure function of the key and the seed, which the test rebuilds and
checks against the recorded sha256.

Made with commit a506df5756472e2ebaf9078affdde2c4f1502cd4 of CompVis/latent-diffusion and commit
2725fed42a14898744433809949834e26957bcdd of hustvl/LightningDiT.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_convert_llamagen_vq import golden_tensor, golden_values, weights_sha256  # noqa: E402

from peer import load_peer  # noqa: E402

LDM_FILES = ["ldm/models/autoencoder.py", "ldm/modules/diffusionmodules/model.py",
             "ldm/modules/diffusionmodules/util.py", "ldm/modules/attention.py",
             "ldm/modules/distributions/distributions.py", "ldm/util.py"]
LIGHTNINGDIT_FILE = "tokenizer/autoencoder.py"
WIDTH, IMAGES, SIZE, SEED = 32, 4, 32, 0
# LDM ddconfigs (models/first_stage_models/kl-f*/config.yaml; SD's v1-inference.yaml first_stage_config) at WIDTH.
LDM_LAYOUTS = {
    "ldm_kl_f8": {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                               "out_ch": 3, "ch": WIDTH, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                               "attn_resolutions": [], "dropout": 0.0}},
    "ldm_kl_f32": {"embed_dim": 64, "ddconfig": {"double_z": True, "z_channels": 64, "resolution": 256,
                                                 "in_channels": 3, "out_ch": 3, "ch": WIDTH,
                                                 "ch_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
                                                 "attn_resolutions": [16, 8], "dropout": 0.0}},
}
VAVAE = {"embed_dim": 32, "ch_mult": [1, 1, 2, 2, 4]}  # tokenizer/vavae.py: AutoencoderKL(embed_dim, (1, 1, 2, 2, 4))


def stand_ins() -> None:
    """Empty modules for imports that only the peers' training and image-loading code uses."""
    def module(name: str, **attrs) -> None:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    module("pytorch_lightning", LightningModule=type("LightningModule", (torch.nn.Module,), {}))
    for name in ("taming", "taming.modules", "taming.modules.vqvae"):
        module(name)
    module("taming.modules.vqvae.quantize", VectorQuantizer2=None)
    module("torchvision")
    module("torchvision.transforms")
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


def build_ldm(peer, layout: dict) -> torch.nn.Module:
    return peer.AutoencoderKL(ddconfig=layout["ddconfig"], lossconfig={"target": "torch.nn.Identity"},
                              embed_dim=layout["embed_dim"])


def build_vavae(peer) -> torch.nn.Module:
    """LightningDiT's AutoencoderKL as tokenizer/vavae.py builds it, with its encoder and decoder rebuilt at
    WIDTH by the same classes (AutoencoderKL fixes the width at 128), attention at 16 px as model_type vavae."""
    d, mult = VAVAE["embed_dim"], VAVAE["ch_mult"]
    model = peer.AutoencoderKL(embed_dim=d, ch_mult=tuple(mult))
    model.encoder = peer.Encoder(ch=WIDTH, ch_mult=mult, z_channels=d)
    model.decoder = peer.Decoder(ch=WIDTH, ch_mult=mult, z_channels=d, attn_resolutions=(16,))
    return model


@torch.no_grad()
def golden(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: golden_tensor(k, shape, SEED) for k, shape in layout.items()}, strict=True)
    model.eval().double()
    images = torch.from_numpy(golden_values("images", IMAGES * 3 * SIZE * SIZE, SEED).astype("float32"))
    images = images.reshape(IMAGES, 3, SIZE, SIZE)
    posterior = model.encode(images.double())
    decoded = model.decode(posterior.mode())
    tensors = {"images": images, "mean": posterior.mean, "logvar": posterior.logvar, "decoded": decoded}
    meta = {"width": str(WIDTH), "seed": str(SEED),
            "state_keys": json.dumps([[k, list(s)] for k, s in layout.items()]),
            "weights_sha256": weights_sha256(model.state_dict())}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ldm_git", type=Path, help="git directory of CompVis/latent-diffusion (clone or bare)")
    parser.add_argument("lightningdit_git", type=Path, help="git directory of hustvl/LightningDiT (clone or bare)")
    parser.add_argument("--ldm-rev", default="HEAD")
    parser.add_argument("--lightningdit-rev", default="HEAD")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    stand_ins()
    ldm, ldm_commit = load_peer(args.ldm_git, args.ldm_rev, LDM_FILES, "ldm.models.autoencoder")
    ldit, ldit_commit = load_peer(args.lightningdit_git, args.lightningdit_rev, [LIGHTNINGDIT_FILE],
                                  "tokenizer.autoencoder")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(name, build_ldm(ldm, layout), {"ddconfig": json.dumps(layout["ddconfig"]),
                                            "embed_dim": str(layout["embed_dim"]),
                                            "peer": f"CompVis/latent-diffusion {LDM_FILES[0]} (AutoencoderKL)",
                                            "peer_commit": ldm_commit})
            for name, layout in LDM_LAYOUTS.items()]
    runs.append(("vavae_f16d32", build_vavae(ldit),
                 {"ch_mult": json.dumps(VAVAE["ch_mult"]), "embed_dim": str(VAVAE["embed_dim"]),
                  "peer": f"hustvl/LightningDiT {LIGHTNINGDIT_FILE} (AutoencoderKL)", "peer_commit": ldit_commit}))
    for name, model, extra in runs:
        torch.manual_seed(0)  # nothing depends on it (every weight is filled); keeps the build quiet and repeatable
        tensors, meta = golden(model)
        meta.update({**extra, "torch": torch.__version__})
        path = args.out / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        print(f"{path}: {path.stat().st_size // 1024} KB")
    print(f"latent-diffusion commit {ldm_commit}\nLightningDiT commit {ldit_commit}")


if __name__ == "__main__":
    main()
