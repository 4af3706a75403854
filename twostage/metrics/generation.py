"""Generation metrics of a sample set against a reference: FD, sFD, IS-style score, precision/recall,
and the estimators of twostage/metrics/unbiased.py (FD extrapolated to N = inf, KID, a bootstrap
interval of FD).

Samples file (`load_samples`, the one reader of samples files): an .npz with uint8 images under
`arr_0` (the ADM evaluator layout, NHWC, as `generator sample` writes them) or `images` / `samples`
(files written before the switch, other samplers), optional labels under `arr_1` / `labels` (the keys
looked for: twostage.data.datasets.npz_keys), and an optional `protocol` entry (a JSON string written
by the sampler: sampler, steps, cfg_scale, cfg_interval, seed, precision, label_sampling). Float
images in [-1, 1] are accepted and quantized to uint8 first, so in-memory samples and saved samples
give the same numbers. Anything else (float images in [0, 1] or [0, 255], NaNs, an empty array, a
tokens-only file, a file that is not an .npz archive) is refused with a `SamplesError` naming the
convention, never scored.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twostage.backbones.base import FeatureNetwork
from twostage.common.errors import UserError
from twostage.data.datasets import npz_keys
from twostage.metrics.extraction import extract_features
from twostage.metrics.frechet import feature_stats, frechet_distance, psd_sqrt
from twostage.metrics.inception_score import inception_score
from twostage.metrics.precision_recall import precision_recall
from twostage.metrics.protocol import Protocol, device_description, metric_name
from twostage.metrics.reference import ReferenceStats, reference_stats

log = logging.getLogger(__name__)

__all__ = ["Samples", "SamplesError", "SAMPLES_CONVENTION", "load_samples", "to_uint8_nhwc", "label_sampling",
           "evaluate_generation", "generation_metrics", "default_fdinf_min_fraction"]

SAMPLES_CONVENTION = ("uint8 images in [0, 255], NHWC (N, H, W, C) as the ADM layout (NCHW and (N, H, W) "
                      "are accepted), or float images in [-1, 1]")
# Decoders overshoot [-1, 1] a little and are clamped; farther out the images are on another scale.
_FLOAT_SLACK = 0.5


class SamplesError(UserError, ValueError):
    """Samples that do not follow the convention (SAMPLES_CONVENTION); the message says how to fix them."""


@dataclass
class Samples:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None
    protocol: dict


def to_uint8_nhwc(images) -> np.ndarray:
    """uint8 NHWC/NCHW/NHW or float [-1,1] NCHW/NHWC -> uint8 (N, H, W, C).

    Refused (SamplesError): an empty array, other dtypes, NaN/inf, and float images that are not on
    the [-1, 1] scale: no negative value at all (images in [0, 1] would otherwise be scored as mostly
    bright grey) or values beyond [-1.5, 1.5] (e.g. floats in [0, 255])."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise SamplesError(f"images must be (N, H, W[, C]) or (N, C, H, W), got shape {x.shape}; "
                           f"expected {SAMPLES_CONVENTION}")
    if x.shape[0] == 0:
        raise SamplesError(f"no images: the sample array is empty (shape {x.shape})")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] not in (1, 3):
        raise SamplesError(f"images of shape {x.shape} have neither 1 nor 3 channels; expected {SAMPLES_CONVENTION}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise SamplesError(f"images are {x.dtype}; expected {SAMPLES_CONVENTION} "
                               f"(convert integer images in [0, 255] with .astype(np.uint8))")
        if not np.isfinite(x).all():
            raise SamplesError(f"{int((~np.isfinite(x)).sum())} pixel values are NaN or inf; the sampler "
                               f"diverged or the images were never written")
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 or lo < -1.0 - _FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
            scale = "[0, 1]" if lo >= 0.0 and hi <= 1.0 else "[0, 255]" if lo >= 0.0 and hi > 1.0 + _FLOAT_SLACK \
                else "another scale"
            raise SamplesError(f"float images range over [{lo:.3g}, {hi:.3g}], which looks like {scale}, but float "
                               f"images must be in [-1, 1]; expected {SAMPLES_CONVENTION}. Convert [0, 1] images "
                               f"with x * 2 - 1, or save uint8 images (round(x * 255) for [0, 1]; "
                               f"round((x + 1) * 127.5) for [-1, 1] images that have no dark pixel at all)")
        # round-half-away like (x + 1) * 127.5 + 0.5 then floor: the usual sample-saving rule
        x = np.clip(np.floor((x.astype(np.float64) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)
    return x


def _open_npz(path: Path):
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise SamplesError(f"{path} is a single .npy array, not an .npz archive; write samples with "
                           f"np.savez(path, arr_0=images, arr_1=labels)")
    if not head.startswith(b"PK"):
        what = "empty" if not head else f"starts with {head!r}"
        raise SamplesError(f"{path} is not an .npz file (a zip archive of arrays, as np.savez writes; this file is "
                           f"{what}); write samples with np.savez(path, arr_0=images, arr_1=labels)")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise SamplesError(f"{path} cannot be read as an .npz archive ({err}); write samples with "
                           f"np.savez(path, arr_0=images, arr_1=labels)") from None


def load_samples(path: str | Path) -> Samples:
    """Read a samples .npz (see the module docstring); SamplesError for anything off convention."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with _open_npz(path) as z:
        key, lkey = npz_keys(z.files)
        if key is None:
            raise SamplesError(f"{path}: no images; expected uint8 images under 'arr_0' (ADM layout), "
                               f"'images' or 'samples', found {z.files}")
        try:
            raw = z[key]
            if len(raw) == 0 and "tokens" in z.files:
                raise SamplesError("it holds tokens only (sampled with --tokens-only): sample again without "
                                   "--tokens-only to get images to score")
            images = to_uint8_nhwc(raw)
            labels = z[lkey] if lkey else None
            proto = json.loads(str(z["protocol"])) if "protocol" in z.files else {}
        except SamplesError as err:
            raise SamplesError(f"{path} ({key}): {err}") from None
        except (ValueError, zipfile.BadZipFile, OSError) as err:  # object arrays, a damaged member, bad JSON
            raise SamplesError(f"{path}: cannot read its arrays ({err})") from None
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise SamplesError(f"{path}: labels ({lkey}) must be {len(images)} integers, one per image; got "
                               f"{labels.dtype} of shape {labels.shape}")
        labels = labels.astype(np.int64)
    side = path.with_suffix(".json")  # a sidecar written next to the samples also counts
    if not proto and side.is_file():
        proto = json.loads(side.read_text()).get("protocol", {})
    return Samples(images, labels, proto)


def label_sampling(labels: np.ndarray | None) -> str:
    """Describe how labels were drawn, from the labels themselves."""
    if labels is None:
        return "unknown (no labels saved)"
    if len(labels) == 0 or labels.min() < 0:
        return "unknown (no labels, or negative labels)"
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if counts.min() == counts.max():
        return "balanced"
    return f"unbalanced (per-class counts {counts.min()}..{counts.max()})"


# Settings of the estimators of unbiased.py in the generation metrics (costs: see generation_metrics).
FDINF_NUM_SIZES = 5
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # clean-fid / torch-fidelity's KID settings
BOOTSTRAP_RESAMPLES = 200  # the count to ask for; the bootstrap itself is off by default (its cost)
CONFIDENCE = 0.95


def default_fdinf_min_fraction(n: int, dim: int) -> float:
    """Smallest FD_inf subset as a fraction of N: 2.5 D / N, kept within [0.1, 0.5].

    unbiased.fd_infinity wants the subsets well above the feature dimension D (its docstring: D =
    1280, N = 5000: fraction 0.1 -> FD_inf -4.8, 0.3 -> 1.5, 0.5 -> 2.5, truth 3.2); 0.1 is Chong &
    Forsyth's 5k..50k, reached once N >= 25 D; below N = 5 D even half the samples are < 2.5 D."""
    return float(min(0.5, max(0.1, 2.5 * dim / max(n, 1))))


def generation_metrics(
    feats: dict[str, torch.Tensor],
    ref: ReferenceStats,
    network: str,
    is_splits: int = 10,
    pr_k: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    fdinf: bool = True,
    fdinf_num_sizes: int = FDINF_NUM_SIZES,
    fdinf_min_fraction: float | None = None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    bootstrap_resamples: int = 0,
    confidence: float = CONFIDENCE,
    record: dict | None = None,
) -> dict[str, float]:
    """Metrics from already-extracted sample features against reference statistics.

    Always: FD-<net> (FID for Inception-v3), sFD-<net> (when both sides have spatial features),
    IS-<net> and IS-<net>_std (samples shuffled with `seed` before the `is_splits` splits: sample
    files are grouped by class), Precision-/Recall-<net> (when the reference holds features).
    Optional, from twostage/metrics/unbiased.py (read its caveats):
    - `fdinf` (on): FDinf-<net> and FDinf-<net>_stderr: FD at `fdinf_num_sizes` subset sizes from
      fdinf_min_fraction * N to N (default default_fdinf_min_fraction(N, D)), extrapolated to
      N = inf. The stderr is the regression's only, not the sampling error of the sample set; with
      N < 5 D the subsets are small against D and FD_inf overshoots downwards (noted in `record`).
      Measured (benchmarks/metric_variance.py, real test images vs the train split, D = 1280):
      N = 2000 gave -0.43 +- 0.12 (std over 5 disjoint sets) where all 10k give 0.08.
    - `kid_subsets` > 0 (on, 100 x 1000): KID-<net> and KID-<net>_stderr (unbiased MMD^2, cubic
      kernel, averaged over kid_subsets subsets of kid_subset_size per side), against the
      reference's stored raw pool features (`ref.pr_features`, up to 10k). A statistics file
      without raw features (mean and covariance only) gives no KID; `record` says so. The stderr
      describes the averaging over overlapping subsets; the spread over fresh sample sets was 3x
      larger at N = 2000 (0.052e-3 vs 0.018e-3).
    - `bootstrap_resamples` > 0 (off by default: one symmetric eigensolve per resample, 200
      resamples take 2-3 min on 2 CPU cores, 18 s on 16): FD-<net>_low / FD-<net>_high, the
      centered percentile interval (level `confidence`) of FD over resamples of the sample set,
      where FD of another sample set of this size should fall. Resampled FDs carry FD's small-N
      bias once more, hence centered. For a near-perfect model it is far too wide (real test
      images, N = 2000: bootstrap std 0.17, spread over disjoint sets 0.025): FD is then a
      degenerate statistic, for which the bootstrap is known to fail.
    Every estimator is seeded with `seed`. `record`, when given, receives the settings used (sizes,
    subset counts, seeds, skipped estimators and why), for the protocol record.

    Seconds for N = 2000, D = 1280, 10k reference features, features already extracted, on 2 CPU
    cores shared with other jobs (load 2.5-5; extracting the features takes 3-5 min there): FD 3-10,
    FD_inf 5, KID 22-25, bootstrap (200) 105-186; on a 16-core host: 0.3, 0.5, 3.9, 18.5."""
    out: dict[str, float] = {}
    notes: dict = record if record is not None else {}
    pool = feats["pool"].numpy()
    n, dim = pool.shape
    s = feature_stats(pool)
    fd_name = metric_name("fd", network)
    out[fd_name] = frechet_distance(s.mu, s.sigma, ref.pool.mu, ref.pool.sigma)
    notes["metric_seed"] = seed
    # A square root of the reference covariance, shared by the bootstrap and FD_inf (with N <= D they need none)
    ref_sqrt = psd_sqrt(ref.pool.sigma) if (bootstrap_resamples > 0 or fdinf) and n > dim else None
    if bootstrap_resamples > 0:
        from twostage.metrics.unbiased import bootstrap_fd

        log.info("FD bootstrap interval: %d resamples of %d samples", bootstrap_resamples, n)
        boot = bootstrap_fd(pool, ref.pool.mu, ref.pool.sigma, num_resamples=bootstrap_resamples,
                            confidence=confidence, seed=seed, ref_sigma_sqrt=ref_sqrt, device=device)
        low, high = boot.centered
        out[fd_name + "_low"], out[fd_name + "_high"] = max(low, 0.0), high  # FD >= 0
        notes["fd_bootstrap"] = {"num_resamples": bootstrap_resamples, "confidence": confidence, "seed": seed,
                                 "interval": "percentile interval of FD over resamples of the samples (with "
                                             "replacement), shifted by -bias to center on FD, low end clipped "
                                             "at 0; too wide for near-perfect models (FD degenerate)"}
    else:
        notes["fd_bootstrap"] = "off"
    if ref.spatial is not None and "spatial" in feats:
        sp = feature_stats(feats["spatial"].numpy())
        out[metric_name("sfd", network)] = frechet_distance(sp.mu, sp.sigma, ref.spatial.mu, ref.spatial.sigma)
    if "logits" in feats and n >= is_splits:
        mean, std = inception_score(feats["logits"].numpy(), splits=is_splits, shuffle_seed=seed)
        out[metric_name("is", network)] = mean
        out[metric_name("is", network) + "_std"] = std
        notes["is_order"] = f"shuffled with seed {seed}, then {is_splits} consecutive splits"
    if ref.pr_features is not None:
        # equal-size sets, as the metric assumes; subsample the larger one with a fixed seed
        m = min(len(pool), len(ref.pr_features))
        rng = np.random.default_rng(seed)
        fake = pool[np.sort(rng.choice(len(pool), m, replace=False))] if len(pool) > m else pool
        real = ref.pr_features[np.sort(rng.choice(len(ref.pr_features), m, replace=False))] \
            if len(ref.pr_features) > m else ref.pr_features
        p, r = precision_recall(real, fake, k=pr_k, device=device)
        out[metric_name("precision", network)], out[metric_name("recall", network)] = p, r
    if fdinf:
        from twostage.metrics.unbiased import fd_infinity

        frac = fdinf_min_fraction if fdinf_min_fraction is not None else default_fdinf_min_fraction(n, dim)
        if n < 10:
            notes["fd_infinity"] = f"skipped: {n} samples are too few to extrapolate"
        else:
            log.info("FD_inf: FD of subsets of %d..%d samples", int(np.ceil(frac * n)), n)
            r = fd_infinity(pool, ref.pool.mu, ref.pool.sigma, num_sizes=fdinf_num_sizes, min_fraction=frac,
                            confidence=confidence, seed=seed, ref_sigma_sqrt=ref_sqrt, device=device)
            name = metric_name("fdinf", network)
            out[name], out[name + "_stderr"] = r.fd_inf, r.stderr
            notes["fd_infinity"] = {"sizes": list(r.sizes), "min_fraction": frac, "num_sizes": fdinf_num_sizes,
                                    "repeats": 1, "seed": seed, "fit": "OLS of FD(N_i) = FDinf + k / N_i",
                                    "stderr": "of the regression only"}
            if min(r.sizes) < 2.5 * dim:
                notes["fd_infinity"]["caveat"] = (f"smallest subset {min(r.sizes)} < 2.5 x {dim} feature dims: "
                                                  "1/N^2 terms bend the line; FDinf is rough and its stderr too small")
    else:
        notes["fd_infinity"] = "off"
    if kid_subsets > 0:
        if ref.pr_features is None:
            notes["kid"] = ("skipped: the reference statistics hold no raw features (mean and covariance only); "
                            "recompute them with `twostage eval stats` to get KID")
            log.info("KID skipped: the reference statistics hold no raw features")
        elif n < 2:
            notes["kid"] = "skipped: fewer than 2 samples"
        else:
            from twostage.metrics.unbiased import kid

            log.info("KID: %d subsets of %d samples", kid_subsets, min(kid_subset_size, n, len(ref.pr_features)))
            k = kid(pool, ref.pr_features, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed,
                    device=device)
            name = metric_name("kid", network)
            out[name], out[name + "_stderr"] = k.mean, k.stderr
            notes["kid"] = {"num_subsets": k.num_subsets, "subset_size": k.subset_size, "seed": seed,
                            "kernel": "(x.y / d + 1)^3", "reference_features": int(len(ref.pr_features)),
                            "reference": "the raw pool features stored with the reference statistics",
                            "stderr": "std over subsets / sqrt(num_subsets): the averaging only (subsets overlap "
                                      "when num_subsets x subset_size > N), not the spread over new sample sets"}
    else:
        notes["kid"] = "off"
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
    seed: int = 0,
    fdinf: bool = True,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    bootstrap_resamples: int = 0,
    progress: bool = True,
) -> tuple[dict[str, float], Protocol]:
    """All generation metrics of `samples` vs `reference` (e.g. "fashion-mnist:test"; statistics over
    its first `reference_max_images` images when given, cached like the full set). The estimator
    options (seed, fdinf, kid_subsets, kid_subset_size, bootstrap_resamples) are those of
    `generation_metrics`; their settings go into the protocol's `extra`. progress: tqdm bars."""
    if not isinstance(samples, Samples):
        samples = Samples(to_uint8_nhwc(samples), None, {})
    n, h, w, _ = samples.images.shape
    if n < 2:
        raise SamplesError(f"{n} sample image(s): FD and every other metric here need at least 2")
    if h != w:
        raise SamplesError(f"samples are {h}x{w}; reference statistics are built for square images")
    net = net.to(device)
    ref, ref_path = reference_stats(reference, net, h, resize=resize, max_images=reference_max_images,
                                    batch_size=batch_size, device=device, precision=precision, cache_dir=cache_dir,
                                    progress=progress)
    feats = extract_features(net, samples.images, batch_size, device, precision, progress=progress,
                             desc="sample features")
    settings: dict = {}
    metrics = generation_metrics(feats, ref, net.name, is_splits, pr_k, device, seed, fdinf=fdinf,
                                 kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                 bootstrap_resamples=bootstrap_resamples, record=settings)
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
    proto.extra.update(settings)
    return metrics, proto
