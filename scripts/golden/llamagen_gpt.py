"""Golden outputs of LlamaGen's own class-conditional GPT, for tests/test_convert_llamagen_gpt.py.

    python scripts/golden/llamagen_gpt.py PEER_GIT [--rev HEAD] [--out tests/golden]

PEER_GIT is a git directory of FoundationVision/LlamaGen (a clone, or a bare mirror). The script takes
autoregressive/models/gpt.py at --rev out of it, with the one repository module it imports
(utils/drop_path.py), into a temporary folder, imports it as it is (it needs torch only), and builds a
small c2i Transformer with LlamaGen's own classes: 2 layers, width 64, 4 heads, vocabulary 64, 10
classes (+ the null row: class_dropout_prob 0.1), block size 16 (a 4x4 grid), one class token,
LlamaGen's FFN rule (multiple of 256) and all dropouts 0. Its weights are filled deterministically
(the head too, which LlamaGen zero-initialises). It runs 4 sequences (labels 3, 7, the null class 10,
0) two ways, in float64 weights (LlamaGen's code keeps its RMSNorm statistics, RoPE and logits in
float32 by its own casts, so the reference is float32-exact at those points, not float64-exact):

- teacher-forced, the training path of LlamaGen's train_c2i.py (`model(idx=tokens[:, :-1],
  cond_idx=labels)` in train mode, label dropout off): `logits` (4, 16, 64);
- with LlamaGen's KV cache, as its generate.py does: prefill the class token at input_pos 0, then one
  token per step at input_pos 1..15 (eval mode): `logits_cached` (4, 16, 64).

It writes tests/golden/llamagen_gpt.safetensors with the tokens, labels and both logits, and in the
metadata the commit, the architecture, the state dict's key layout and the sha256 of its weights; it
prints the commit. The weights (0.14M values) are not stored: they come from the VQ test's
`golden_tensor` fill, a pure function of the key and the seed, which the GPT test rebuilds and checks
against the recorded sha256.

Made with commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec (2024-06-30) of FoundationVision/LlamaGen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_convert_llamagen_vq import golden_tensor, golden_values, weights_sha256  # noqa: E402

from peer import load_peer  # noqa: E402

PEER_FILES = ("autoregressive/models/gpt.py", "utils/drop_path.py")
LAYERS, WIDTH, HEADS, VOCAB, CLASSES, GRID = 2, 64, 4, 64, 10, 4
LABELS = [3, 7, CLASSES, 0]  # CLASSES: the null class
SEED = 0


def build(peer) -> torch.nn.Module:
    args = peer.ModelArgs(dim=WIDTH, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, num_classes=CLASSES,
                          block_size=GRID * GRID, cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0,
                          attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0,
                          model_type="c2i")
    return peer.Transformer(args)


@torch.no_grad()
def golden(peer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model = build(peer)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: golden_tensor(k, shape, SEED) for k, shape in layout.items()}, strict=True)
    sha = weights_sha256(model.state_dict())
    model.double()
    model.cls_embedding.dropout_prob = 0.0  # label dropout off: the training path, deterministic
    n = GRID * GRID
    tokens = torch.from_numpy((golden_values("tokens", len(LABELS) * n, SEED) * 1e6).astype(np.int64) % VOCAB)
    tokens = tokens.reshape(len(LABELS), n)
    labels = torch.tensor(LABELS)

    model.train()
    logits, _ = model(idx=tokens[:, :-1], cond_idx=labels)

    model.eval()
    model.setup_caches(max_batch_size=len(LABELS), max_seq_length=n, dtype=torch.float64)
    steps = [model(None, labels, input_pos=torch.arange(0, 1))[0][:, -1]]
    for pos in range(1, n):
        steps.append(model(tokens[:, pos - 1 : pos], None, input_pos=torch.tensor([pos]))[0][:, -1])
    cached = torch.stack(steps, dim=1)

    tensors = {"tokens": tokens, "labels": labels, "logits": logits, "logits_cached": cached}
    meta = {"layers": str(LAYERS), "width": str(WIDTH), "heads": str(HEADS), "vocab_size": str(VOCAB),
            "num_classes": str(CLASSES), "grid": str(GRID), "seed": str(SEED),
            "state_keys": json.dumps([[k, list(s)] for k, s in layout.items()]), "weights_sha256": sha}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer_git", type=Path, help="git directory of FoundationVision/LlamaGen (clone or bare)")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    peer, commit = load_peer(args.peer_git, args.rev, PEER_FILES, "autoregressive.models.gpt")
    tensors, meta = golden(peer)
    meta.update({"peer": f"FoundationVision/LlamaGen {PEER_FILES[0]}", "peer_commit": commit,
                 "torch": torch.__version__})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "llamagen_gpt.safetensors"
    save_file(tensors, str(path), metadata=meta)
    gap = (tensors["logits"] - tensors["logits_cached"]).abs().max().item()
    print(f"{path}: {path.stat().st_size // 1024} KB, teacher-forced vs cached logits differ by {gap:.1e}")
    print(f"LlamaGen commit {commit}")


if __name__ == "__main__":
    main()
