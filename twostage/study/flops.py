"""Training compute of stage-2 generators: the FLOP-counting convention and the compute C of a run.

Convention (that of the scaling-law literature; Kaplan et al. arXiv 2001.08361, Chinchilla arXiv
2203.15556): 2 FLOPs per multiply-accumulate, matmuls only (norms, activations, softmax and
embedding lookups are left out: they are O(width) per token against O(width^2)), attention scores and
the weighted sum counted over the full T x T square (not halved for causal masks, as in PaLM's MFU
accounting, arXiv 2204.02311), and training = 3 x forward (the backward pass costs two forwards).

Each generator kind counts its own model under this convention, beside the model (the AR
transformer: twostage/generators/ar/model.py `forward_flops_per_token`; LightningDiT:
twostage/generators/dit/model.py `forward_flops_per_image`), per *token of the tokenizer's grid*
(h*w per image, whatever the generator does with them), and records the result in its run's model.json
as `train_flops_per_token` (twostage/generators/runs.py). So for every kind

    C = train_flops_per_token * tokens_seen,    tokens_seen = steps * batch_size * tokens_per_image.
"""

from __future__ import annotations

from typing import Any, Mapping

from twostage.common.errors import UserError


def recorded_flops_per_token(info: Mapping[str, Any], where: str = "model.json") -> float:
    """Training FLOPs per token from a generator run's model.json, whatever its kind."""
    if "train_flops_per_token" not in info:
        raise UserError(f"{where} has no train_flops_per_token: it was written by an older version of twostage; "
                        "train the run again into a new folder")
    return float(info["train_flops_per_token"])


def training_compute(flops_per_token: float, steps: int, batch_size: int, tokens_per_image: int) -> tuple[int, float]:
    """(tokens_seen, C) of a run."""
    tokens_seen = int(steps) * int(batch_size) * int(tokens_per_image)
    return tokens_seen, float(flops_per_token) * tokens_seen


__all__ = ["recorded_flops_per_token", "training_compute"]
