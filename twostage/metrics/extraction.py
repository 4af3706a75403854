"""Feature extraction for metrics: any image source, in batches, to float64 features on the CPU.

Distribution metrics (FD, sFD, IS, precision/recall) need the features of thousands of images that
arrive as a tensor, a uint8 array saved by a sampler, or an iterator of batches from a dataset. All
of them go through `extract_features`, so saved uint8 samples and in-memory float images follow the
same path (uint8 -> [-1, 1] here, then the network's own resizing) and give the same numbers.
Features are returned in float64 because the Fréchet distance is computed in float64 (frechet.py).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from twostage.backbones.base import FeatureNetwork

__all__ = ["extract_features", "as_model_input"]


@torch.no_grad()
def extract_features(
    net: FeatureNetwork,
    images,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    keys: tuple[str, ...] = ("pool", "spatial", "logits"),
    *,
    progress: bool = True,
    total: int | None = None,
    desc: str = "features",
) -> dict[str, Tensor]:
    """Run `net` over `images` in batches; returns float64 CPU tensors per key.

    images: a tensor / uint8 NHWC or NCHW numpy array / iterable of batches. uint8 is mapped to
    [-1,1] here, so samples saved as uint8 and float images follow the same path.
    precision: "fp32" or "bf16" (autocast; recorded in the protocol by the caller).
    progress: a tqdm bar on stderr (images done, images/s, time left; `total` images when `images`
    is an iterable of batches, else its length), labelled `desc`.
    """
    from tqdm.auto import tqdm

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    if total is None and _is_array(images):
        total = len(images)
    out: dict[str, list[Tensor]] = {}
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(images, batch_size):
            x = as_model_input(batch).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                feats = net(x)
            for k in keys:
                if k in feats:
                    out.setdefault(k, []).append(feats[k].float().cpu())
            bar.update(x.shape[0])
    return {k: torch.cat(v).double() for k, v in out.items()}


def as_model_input(batch) -> Tensor:
    """uint8 (N,H,W[,C]) or (N,C,H,W) arrays/tensors -> float [-1,1] NCHW; float passes through."""
    x = torch.as_tensor(batch)
    if x.ndim == 3:  # (N,H,W) grayscale
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    return x.float()


def _is_array(images) -> bool:
    return isinstance(images, Tensor) or hasattr(images, "__array__") and not isinstance(images, list)


def _batches(images, batch_size: int) -> Iterator:
    """Slices of an array or tensor; the batches of any other iterable as they come."""
    if _is_array(images):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images
