"""Golden outputs of LlamaGen's own VQ model, for tests/test_convert_llamagen_vq.py.

    python scripts/golden/llamagen_vq.py PEER_GIT [--rev HEAD] [--out tests/golden]

PEER_GIT is a git directory of FoundationVision/LlamaGen (a clone, or a bare mirror). The script takes
tokenizer/tokenizer_image/vq_model.py at --rev out of it, imports that file as it is (it needs torch
only), and for each published layout, VQ-16 (channel multipliers 1,1,2,2,4) and VQ-8 (1,2,2,4), builds
a small-width instance with LlamaGen's own classes (base width 32, z channels 16, codebook 64, code dim
8; the published models have width 128, z 256, codebook 16384), fills its weights deterministically,
and runs 6 images of 32x32 through it in float64, so that the reference carries no float32 rounding of
its own (in float32 this random network's outputs wander ~5e-6 from the float64 ones, in either
implementation). It writes tests/golden/llamagen_<layout>.safetensors with the images (float32),
LlamaGen's pre-quantization latents (quant_conv output, float64), code indices and the images decoded
from the codes (VQModel.decode_code, float64), and in the metadata the commit, the architecture, the
state dict's key layout and the sha256 of the weights; it prints the commit.

The weights themselves (4.4M values per model: LlamaGen's GroupNorm of 32 groups puts a floor on the
width) are not stored: they come from the test's `golden_tensor` fill, a pure function of the key and
the seed, which the test rebuilds and checks against the recorded sha256.

Made with commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec (2024-06-30) of FoundationVision/LlamaGen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_convert_llamagen_vq import golden_tensor, golden_values, weights_sha256  # noqa: E402

from peer import load_peer  # noqa: E402

PEER_FILE = "tokenizer/tokenizer_image/vq_model.py"
LAYOUTS = {"vq16": [1, 1, 2, 2, 4], "vq8": [1, 2, 2, 4]}
WIDTH, Z_CHANNELS, CODEBOOK, CODE_DIM = 32, 16, 64, 8
IMAGES, SIZE, SEED = 6, 32, 0
MIN_MARGIN = 1e-4  # nearest-code distance gap below which rounding could flip a code between implementations


def build(peer, mult: list[int]) -> torch.nn.Module:
    """LlamaGen's VQModel with the layout `mult` at small width (VQModel itself fixes the width at 128, so
    its encoder and decoder are rebuilt with LlamaGen's Encoder / Decoder at width WIDTH)."""
    args = peer.ModelArgs(codebook_size=CODEBOOK, codebook_embed_dim=CODE_DIM, encoder_ch_mult=mult,
                          decoder_ch_mult=mult, z_channels=Z_CHANNELS)
    model = peer.VQModel(args)
    model.encoder = peer.Encoder(ch=WIDTH, ch_mult=mult, z_channels=Z_CHANNELS, dropout=args.dropout_p)
    model.decoder = peer.Decoder(ch=WIDTH, ch_mult=mult, z_channels=Z_CHANNELS, dropout=args.dropout_p)
    return model


def code_margin(model: torch.nn.Module, latent: torch.Tensor) -> float:
    """Smallest gap between the nearest and second-nearest code distance over all positions."""
    z = F.normalize(latent.permute(0, 2, 3, 1).reshape(-1, CODE_DIM), dim=-1)
    codes = F.normalize(model.quantize.embedding.weight, dim=-1)
    dist = torch.cdist(z, codes).square()
    two = dist.topk(2, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


@torch.no_grad()
def golden(peer, mult: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model = build(peer, mult)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: golden_tensor(k, shape, SEED) for k, shape in layout.items()}, strict=True)
    model.eval().double()
    images = torch.from_numpy(golden_values("images", IMAGES * 3 * SIZE * SIZE, SEED).astype("float32"))
    images = images.reshape(IMAGES, 3, SIZE, SIZE)
    latent = model.quant_conv(model.encoder(images.double()))
    _, _, (_, _, indices) = model.quantize(latent)
    margin = code_margin(model, latent)
    if margin < MIN_MARGIN:
        raise SystemExit(f"codes {margin:.2e} apart from a tie: rounding could flip one; change SEED")
    n, d, h, w = latent.shape
    decoded = model.decode_code(indices, shape=(n, d, h, w))
    tensors = {"images": images, "latent": latent, "indices": indices.reshape(n, h, w), "decoded": decoded}
    meta = {"ch": str(WIDTH), "ch_mult": json.dumps(mult), "z_channels": str(Z_CHANNELS),
            "codebook_size": str(CODEBOOK), "codebook_embed_dim": str(CODE_DIM), "seed": str(SEED),
            "state_keys": json.dumps([[k, list(s)] for k, s in layout.items()]),
            "weights_sha256": weights_sha256(model.state_dict()), "code_margin": f"{margin:.3e}"}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer_git", type=Path, help="git directory of FoundationVision/LlamaGen (clone or bare)")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    peer, commit = load_peer(args.peer_git, args.rev, [PEER_FILE], "tokenizer.tokenizer_image.vq_model")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, mult in LAYOUTS.items():
        tensors, meta = golden(peer, mult)
        meta.update({"peer": f"FoundationVision/LlamaGen {PEER_FILE}", "peer_commit": commit,
                     "torch": torch.__version__})
        path = args.out / f"llamagen_{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        print(f"{path}: {path.stat().st_size // 1024} KB, code margin {meta['code_margin']}")
    print(f"LlamaGen commit {commit}")


if __name__ == "__main__":
    main()
