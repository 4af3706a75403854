"""Generation metrics of a sample set against a reference: FD, sFD, IS-style score, precision/recall.

Samples file (`load_samples`): an .npz with uint8 images under `arr_0` (the ADM evaluator layout,
NHWC) or `images` / `samples`, optional labels under `arr_1` / `labels`, and an optional
`protocol` entry (a JSON string written by the sampler: sampler, steps, cfg_scale, cfg_interval,
seed, precision, label_sampling). Float images in [-1, 1] are accepted and quantized to uint8
first, so in-memory samples and saved samples give the same numbers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twostage.backbones.base import FeatureNetwork
from twostage.metrics.extraction import extract_features
from twostage.metrics.frechet import feature_stats, frechet_distance
from twostage.metrics.inception_score import inception_score
from twostage.metrics.precision_recall import precision_recall
from twostage.metrics.protocol import Protocol, device_description, metric_name
from twostage.metrics.reference import ReferenceStats, reference_stats

log = logging.getLogger(__name__)

__all__ = ["Samples", "load_samples", "to_uint8_nhwc", "label_sampling", "evaluate_generation",
           "generation_metrics"]


@dataclass
class Samples:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None
    protocol: dict


def to_uint8_nhwc(images) -> np.ndarray:
    """uint8 NHWC/NCHW/NHW or float [-1,1] NCHW/NHWC -> uint8 (N, H, W, C)."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W[, C]) or (N, C, H, W), got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float in [-1, 1], got {x.dtype}")
        # round-half-away like (x + 1) * 127.5 + 0.5 then floor: the usual sample-saving rule
        x = np.clip(np.floor((x.astype(np.float64) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)
    return x


def load_samples(path: str | Path) -> Samples:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        key = next((k for k in ("arr_0", "images", "samples") if k in z.files), None)
        if key is None:
            raise ValueError(f"{path}: no images; expected uint8 images under 'arr_0' (ADM layout), "
                             f"'images' or 'samples', found {z.files}")
        images = to_uint8_nhwc(z[key])
        lkey = next((k for k in ("arr_1", "labels") if k in z.files), None)
        labels = z[lkey].astype(np.int64) if lkey else None
        proto = json.loads(str(z["protocol"])) if "protocol" in z.files else {}
    side = path.with_suffix(".json")  # a sidecar written next to the samples also counts
    if not proto and side.is_file():
        proto = json.loads(side.read_text()).get("protocol", {})
    return Samples(images, labels, proto)


def label_sampling(labels: np.ndarray | None) -> str:
    """Describe how labels were drawn, from the labels themselves."""
    if labels is None:
        return "unknown (no labels saved)"
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if counts.min() == counts.max():
        return "balanced"
    return f"unbalanced (per-class counts {counts.min()}..{counts.max()})"


def generation_metrics(
    feats: dict[str, torch.Tensor],
    ref: ReferenceStats,
    network: str,
    is_splits: int = 10,
    pr_k: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Metrics from already-extracted sample features against reference statistics."""
    out: dict[str, float] = {}
    pool = feats["pool"].numpy()
    s = feature_stats(pool)
    out[metric_name("fd", network)] = frechet_distance(s.mu, s.sigma, ref.pool.mu, ref.pool.sigma)
    if ref.spatial is not None and "spatial" in feats:
        sp = feature_stats(feats["spatial"].numpy())
        out[metric_name("sfd", network)] = frechet_distance(sp.mu, sp.sigma, ref.spatial.mu, ref.spatial.sigma)
    if "logits" in feats and len(pool) >= is_splits:
        mean, std = inception_score(feats["logits"].numpy(), splits=is_splits)
        out[metric_name("is", network)] = mean
        out[metric_name("is", network) + "_std"] = std
    if ref.pr_features is not None:
        # equal-size sets, as the metric assumes; subsample the larger one with a fixed seed
        m = min(len(pool), len(ref.pr_features))
        rng = np.random.default_rng(seed)
        fake = pool[np.sort(rng.choice(len(pool), m, replace=False))] if len(pool) > m else pool
        real = ref.pr_features[np.sort(rng.choice(len(ref.pr_features), m, replace=False))] \
            if len(ref.pr_features) > m else ref.pr_features
        p, r = precision_recall(real, fake, k=pr_k, device=device)
        out[metric_name("precision", network)], out[metric_name("recall", network)] = p, r
    return out


def evaluate_generation(
    samples: Samples | np.ndarray | torch.Tensor,
    reference: str,
    net: FeatureNetwork,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    resize: str = "pad",
    protocol: dict | None = None,
    cache_dir: str | Path | None = None,
    is_splits: int = 10,
    pr_k: int = 3,
    reference_max_images: int | None = None,
) -> tuple[dict[str, float], Protocol]:
    """All generation metrics of `samples` vs `reference` (e.g. "fashion-mnist:test"; statistics over
    its first `reference_max_images` images when given, cached like the full set)."""
    if not isinstance(samples, Samples):
        samples = Samples(to_uint8_nhwc(samples), None, {})
    n, h, w, _ = samples.images.shape
    if h != w:
        raise ValueError(f"samples are {h}x{w}; reference statistics are built for square images")
    net = net.to(device)
    ref, ref_path = reference_stats(reference, net, h, resize=resize, max_images=reference_max_images,
                                    batch_size=batch_size, device=device, precision=precision, cache_dir=cache_dir)
    feats = extract_features(net, samples.images, batch_size, device, precision)
    metrics = generation_metrics(feats, ref, net.name, is_splits, pr_k, device)
    given = {**samples.protocol, **(protocol or {})}
    proto = Protocol(
        num_samples=n,
        label_sampling=given.pop("label_sampling", None) or label_sampling(samples.labels),
        precision=precision,
        reference=f"{reference} ({ref.pool.n} images, {h}px, {resize})",
        reference_stats=str(ref_path) if ref_path else None,
        device=device_description(device),
    ).with_network(net)
    for k in ("sampler", "steps", "cfg_scale", "cfg_interval", "seed"):
        if k in given:
            setattr(proto, k, given.pop(k))
    if "precision" in given:  # the sampler's precision, kept apart from the feature precision
        proto.extra["sampling_precision"] = given.pop("precision")
    proto.extra.update(given)
    proto.extra["pr_k"], proto.extra["is_splits"] = pr_k, is_splits
    return metrics, proto
