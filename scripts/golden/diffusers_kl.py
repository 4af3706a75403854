"""Golden outputs of diffusers' own AutoencoderKL, for tests/test_convert_kl.py.

    pip install diffusers   # into the environment that runs this script; the test suite does not need it
    python scripts/golden/diffusers_kl.py [--out tests/golden]

Two published layouts, at small width (block_out_channels 16, 32, 64, 64; the published models have 128,
256, 512, 512), each with 2 ResBlocks per encoder level and norm_num_groups 8 instead of 32 (so the groups
must come from the config.json the converter reads):
  diffusers_kl_sd    Stable Diffusion's VAE (stabilityai/sd-vae-ft-mse): latent 4, quant convs, mid attention,
                     scaling_factor 0.18215 (diffusers' default)
  diffusers_kl_flux  FLUX.1's autoencoder: latent 16, no quant_conv / post_quant_conv, scaling_factor 0.3611,
                     shift_factor 0.1159 (black-forest-labs/FLUX.1-dev vae/config.json)
Each is filled deterministically and runs 4 images of 32x32 in float64. It writes
tests/golden/<layout>.safetensors with the images (float32), the latent distribution's mean and (clamped)
log-variance (`encode(x).latent_dist`) and the images decoded from the mean (`decode(mean).sample`), all
float64, and in the metadata the model's config (what save_pretrained writes as config.json), the diffusers
version, the state dict's key layout and the sha256 of the weights; it prints the version.

The weights are not stored: they come from the tests' `golden_tensor` fill (tests/test_convert_llamagen_vq.py),
which the test rebuilds and checks against the recorded sha256.

Made with diffusers 0.42.1 and torch 2.13.0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_convert_llamagen_vq import golden_tensor, golden_values, weights_sha256  # noqa: E402

IMAGES, SIZE, SEED = 4, 32, 0
COMMON = {"block_out_channels": [16, 32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "sample_size": SIZE,
          "norm_num_groups": 8}
LAYOUTS = {
    "diffusers_kl_sd": {**COMMON, "latent_channels": 4},
    "diffusers_kl_flux": {**COMMON, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                          "scaling_factor": 0.3611, "shift_factor": 0.1159},
}


@torch.no_grad()
def golden(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: golden_tensor(k, shape, SEED) for k, shape in layout.items()}, strict=True)
    model.eval().double()
    images = torch.from_numpy(golden_values("images", IMAGES * 3 * SIZE * SIZE, SEED).astype("float32"))
    images = images.reshape(IMAGES, 3, SIZE, SIZE)
    dist = model.encode(images.double()).latent_dist
    decoded = model.decode(dist.mode()).sample
    tensors = {"images": images, "mean": dist.mean, "logvar": dist.logvar, "decoded": decoded}
    meta = {"seed": str(SEED), "state_keys": json.dumps([[k, list(s)] for k, s in layout.items()]),
            "weights_sha256": weights_sha256(model.state_dict()),
            # config.json as save_pretrained writes it (without diffusers' bookkeeping of defaults)
            "config": json.dumps({"_class_name": type(model).__name__, **{k: v for k, v in model.config.items()
                                                                         if not k.startswith("_")}})}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    import diffusers
    from diffusers import AutoencoderKL

    args.out.mkdir(parents=True, exist_ok=True)
    for name, config in LAYOUTS.items():
        tensors, meta = golden(AutoencoderKL(**config))
        meta.update({"peer": "huggingface/diffusers AutoencoderKL", "diffusers": diffusers.__version__,
                     "torch": torch.__version__})
        path = args.out / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        print(f"{path}: {path.stat().st_size // 1024} KB")
    print(f"diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main()
