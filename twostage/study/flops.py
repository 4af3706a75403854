"""Training compute of stage-2 generators: matmul FLOPs per token and the compute C of a run.

Convention (the one of the scaling-law literature the CRT analysis follows, METHODS section 5):
2 FLOPs per multiply-accumulate, matmuls only (norms, activations, softmax and embedding lookups are
left out: they are O(width) per token against O(width^2)), attention scores and the weighted sum
counted over the full T x T square (not halved for causal masks, as in PaLM's MFU accounting), and
training = 3 x forward (the backward pass costs two forwards). Then

    C = flops_per_token * tokens_seen,    tokens_seen = steps * batch_size * tokens_per_image.

AR (LlamaGen GPT), per token of a sequence of length T, width w, SwiGLU hidden h, vocabulary V:
    forward = L * (8 w^2 + 6 w h + 4 T w) + 2 w V          (qkv 6w^2, out 2w^2, gate+up 4wh, down 2hw)
which is 2 N + 4 L w T with N the matmul parameters, so training = 6 N + 12 L w T: the classic 6 N D
plus the attention term.

LightningDiT, per image of T = (h/p)(w/p) tokens with P = channels * p^2 inputs per token:
    per token:  4 P w (patch embedding + output layer) + L * (8 w^2 + 6 w h + 4 T w)
    per image:  2 * 256 w + 2 w^2 (timestep MLP) + 12 L w^2 (AdaLN of each block) + 4 w^2 (final AdaLN)
The per-image terms act once on the conditioning vector, not per token. A study row's
flops_per_token is the training FLOPs per image divided by the tokenizer's tokens per image (h*w
latent positions), so that C = flops_per_token * tokens_seen holds for any patch size.
"""

from __future__ import annotations

from typing import Any

TIME_FREQ_DIM = 256  # the DiT timestep embedder's sinusoid width (dit_model.TimestepEmbedder)


def ar_forward_flops_per_token(layers: int, width: int, ffn_hidden: int, vocab_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward pass through the AR transformer."""
    w, h = width, ffn_hidden
    per_layer = 8 * w * w + 6 * w * h + 4 * seq_len * w
    return float(layers * per_layer + 2 * w * vocab_size)


def ar_train_flops_per_token(layers: int, width: int, ffn_hidden: int, vocab_size: int, seq_len: int) -> float:
    return 3.0 * ar_forward_flops_per_token(layers, width, ffn_hidden, vocab_size, seq_len)


def ar_matmul_params(layers: int, width: int, ffn_hidden: int, vocab_size: int) -> int:
    """Parameters of the AR model's matmuls (N of 6 N D): blocks and output head, no embeddings or norms."""
    w, h = width, ffn_hidden
    return layers * (4 * w * w + 3 * w * h) + w * vocab_size


def dit_forward_flops_per_image(layers: int, width: int, ffn_hidden: int, in_channels: int, patch_size: int,
                                grid: tuple[int, int]) -> float:
    """Matmul FLOPs of one image's forward pass through LightningDiT (one network evaluation)."""
    w, h, p = width, ffn_hidden, patch_size
    tokens = (grid[0] // p) * (grid[1] // p)
    inputs = in_channels * p * p
    per_token = 4 * inputs * w + layers * (8 * w * w + 6 * w * h + 4 * tokens * w)
    per_image = 2 * TIME_FREQ_DIM * w + 2 * w * w + 12 * layers * w * w + 4 * w * w
    return float(tokens * per_token + per_image)


def dit_train_flops_per_image(layers: int, width: int, ffn_hidden: int, in_channels: int, patch_size: int,
                              grid: tuple[int, int]) -> float:
    return 3.0 * dit_forward_flops_per_image(layers, width, ffn_hidden, in_channels, patch_size, grid)


def ar_flops_from_model_json(info: dict[str, Any]) -> float:
    """Training FLOPs per token of an AR run, from its model.json (written by train_ar)."""
    return ar_train_flops_per_token(int(info["layers"]), int(info["width"]), int(info["ffn_hidden"]),
                                    int(info["vocab_size"]), int(info["seq_len"]))


def dit_flops_from_model_json(info: dict[str, Any], mlp_ratio: float) -> float:
    """Training FLOPs per latent position of a DiT run, from its model.json (written by train_dit)."""
    from twostage.generators.dit.model import ffn_hidden

    width = int(info["width"])
    grid = (int(info["grid"][0]), int(info["grid"][1]))
    per_image = dit_train_flops_per_image(int(info["layers"]), width, ffn_hidden(width, mlp_ratio),
                                          int(info["channels"]), int(info["patch_size"]), grid)
    return per_image / (grid[0] * grid[1])


def training_compute(flops_per_token: float, steps: int, batch_size: int, tokens_per_image: int) -> tuple[int, float]:
    """(tokens_seen, C) of a run."""
    tokens_seen = int(steps) * int(batch_size) * int(tokens_per_image)
    return tokens_seen, float(flops_per_token) * tokens_seen


__all__ = ["ar_forward_flops_per_token", "ar_train_flops_per_token", "ar_matmul_params",
           "dit_forward_flops_per_image", "dit_train_flops_per_image", "ar_flops_from_model_json",
           "dit_flops_from_model_json", "training_compute"]
