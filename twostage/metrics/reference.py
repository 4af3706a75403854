"""Reference statistics per dataset split, cached on disk together with the protocol that made them.

A reference is named like `fashion-mnist:test`, `fashion-mnist:train`, `emoji:test`, `folder:/data/imagenet:val`,
`npz:/data/images.npz:val` (split names: train, val; "test" is an alias of val, which for
Fashion-MNIST *is* the official test set). A path to an .npz file is accepted too (`reference_stats`):
- a statistics file written by `ReferenceStats.save` (`eval stats --out`, the cache), which serves only
  the feature network and image size that made it;
- an ADM reference batch as published with guided-diffusion (e.g. VIRTUAL_imagenet256_labeled.npz:
  images `arr_0`, Inception-v3 pool_3 statistics `mu` / `sigma`, spatial ones `mu_s` / `sigma_s`), or
  any file with `mu` / `sigma` and no protocol (pytorch-fid's statistics): with Inception-v3 its
  statistics are used as they are; any other network gets them computed from its `arr_0` images,
  since ADM's statistics are Inception features;
- an .npz of images alone (`arr_0` or `images`, e.g. a samples file): statistics computed from them.

Statistics files use ADM's keys, so ADM's evaluator reads ours too: `mu`, `sigma` (pool), `mu_s`,
`sigma_s` (spatial), plus `n`, `protocol` (JSON) and `pr_features`; files written before the switch
kept the spatial ones under `mu_spatial` / `sigma_spatial` and still load.

What is cached (one .npz per dataset split x image size x feature network x precision):
- pool mean/covariance (FD), spatial mean/covariance (sFD),
- up to `pr_features` pool features (precision/recall need samples, not moments; ADM uses a 10k
  reference batch), picked with a fixed seed,
- the protocol (dataset, split, count, transform, network, checksum, preprocessing, precision).
The cache key includes the network checksum, so new weights never reuse stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twostage.backbones.base import FeatureNetwork
from twostage.backbones.inception import InceptionFeatures
from twostage.common.atomic import atomic_write
from twostage.common.errors import UserError
from twostage.data.datasets import npz_keys
from twostage.metrics.extraction import extract_features
from twostage.metrics.frechet import FeatureStats, feature_stats

log = logging.getLogger(__name__)

__all__ = ["ReferenceSpec", "ReferenceStats", "ReferenceStatsError", "parse_reference", "reference_stats",
           "load_reference_images"]

SPLIT_ALIASES = {"train": "train", "val": "val", "test": "val", "validation": "val"}
# Keys of the spatial (sFD) statistics: ADM's first (written), then those of files written before the switch.
SPATIAL_KEYS = (("mu_s", "sigma_s"), ("mu_spatial", "sigma_spatial"))


class ReferenceStatsError(UserError, ValueError):
    """A reference that cannot serve this evaluation (an unknown name, statistics of another feature
    network or image size); the message says what to give instead."""


@dataclass(frozen=True)
class ReferenceSpec:
    dataset: str  # fashion-mnist | emoji | folder | npz
    root: str | None
    split: str  # train | val
    text: str  # as the user wrote it


def parse_reference(spec: str) -> ReferenceSpec:
    """'fashion-mnist:test' | 'emoji:test' | 'folder:/path[:split]' | 'npz:/path.npz[:split]'."""
    name, _, rest = spec.partition(":")
    name = name.lower()
    if name in ("fashion-mnist", "emoji"):  # built-in datasets: a split name, no path
        split = rest or "test"
        if split not in SPLIT_ALIASES:
            raise ReferenceStatsError(f"reference {spec!r}: unknown split {split!r}; use train or test (= val)")
        return ReferenceSpec(name, None, SPLIT_ALIASES[split], spec)
    if name in ("folder", "npz"):
        root, split = rest, "val"
        head, _, tail = rest.rpartition(":")
        if head and tail in SPLIT_ALIASES:
            root, split = head, SPLIT_ALIASES[tail]
        if not root:
            raise ReferenceStatsError(f"reference {spec!r} needs a path, e.g. {name}:/data/imagenet:val")
        return ReferenceSpec(name, root, split, spec)
    raise ReferenceStatsError(f"unknown reference {spec!r}; use fashion-mnist:test, fashion-mnist:train, emoji:test, "
                              f"folder:/path[:train|val], npz:/path.npz[:train|val], a statistics .npz file or "
                              f"an ADM reference batch")


@dataclass
class ReferenceStats:
    pool: FeatureStats
    spatial: FeatureStats | None
    pr_features: np.ndarray | None  # (M, D) float32 pool features for precision/recall
    protocol: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.pool.mu, "sigma": self.pool.sigma, "n": np.int64(self.pool.n),
                  "protocol": np.array(json.dumps(self.protocol, sort_keys=True))}
        if self.spatial is not None:
            arrays.update(mu_s=self.spatial.mu, sigma_s=self.spatial.sigma)
        if self.pr_features is not None:
            arrays["pr_features"] = self.pr_features.astype(np.float32)
        with atomic_write(path, "wb") as f:  # jobs of one study may write the same statistics at once
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Statistics from a file of ours or ADM's (keys: see the module docstring). Without `n` (ADM's
        files) the count is that of the images stored with them, or -1 when there are none."""
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ReferenceStatsError(f"{path}: not a reference statistics file (needs 'mu' and 'sigma'; "
                                          f"has {z.files})")
            protocol = json.loads(str(z["protocol"])) if "protocol" in z.files else {}
            images = npz_keys(z.files)[0]
            n = int(z["n"]) if "n" in z.files else _npz_shape(path, images)[0] if images else -1
            pool = FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), n, protocol)
            mu_s, sigma_s = next((keys for keys in SPATIAL_KEYS if keys[0] in z.files), (None, None))
            spatial = (FeatureStats(z[mu_s].astype(np.float64), z[sigma_s].astype(np.float64), n, protocol)
                       if mu_s else None)
            pr = z["pr_features"] if "pr_features" in z.files else None
        return cls(pool, spatial, pr, protocol)


def _npz_shape(path: str | Path, key: str) -> tuple[int, ...]:
    """The shape of one .npz member, from its header alone: a 10k x 256 x 256 reference batch (2 GB) is
    not loaded to learn its size."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(header(f)[0])


def _stats_in_file(path: Path, net: FeatureNetwork, image_size: int) -> ReferenceStats | None:
    """The statistics an .npz given as the reference holds for `net` and `image_size` samples, or None
    when they are to be computed from the images it holds (the cases: see the module docstring)."""
    with np.load(path, allow_pickle=False) as z:
        files = z.files
    images = npz_keys(files)[0]
    if "mu" not in files:
        if images is None:
            raise ReferenceStatsError(f"{path} holds neither statistics (mu, sigma) nor images (arr_0 or images); "
                                      f"found {files}")
        return None
    if "protocol" in files:  # ours: made with one network at one image size
        stats = ReferenceStats.load(path)
        _check_network(stats.protocol, net, path)
        theirs = stats.protocol.get("image_size")
        if theirs is not None and theirs != image_size:
            raise ReferenceStatsError(f"{path} holds statistics of {theirs}px images but the samples are "
                                      f"{image_size}px; compute matching ones with `twostage eval stats REF "
                                      f"--image-size {image_size}`")
        return stats
    if net.name != InceptionFeatures.name:
        if images is None:
            raise ReferenceStatsError(f"{path} holds Inception-v3 statistics (mu, sigma) and no images, so it serves "
                                      f"--network inception-v3 only, not {net.name}; give the reference images "
                                      f"instead (npz:PATH:train, folder:PATH)")
        log.info("%s: its mu / sigma are Inception-v3 statistics; computing %s features of its %s images instead",
                 path, net.name, images)
        return None
    theirs = _npz_shape(path, images)[1] if images else None
    if theirs is not None and theirs != image_size:
        raise ReferenceStatsError(f"{path} holds statistics of {theirs}px images but the samples are {image_size}px")
    stats = ReferenceStats.load(path)
    stats.protocol = {"reference": str(path), "image_size": theirs, "num_images": stats.pool.n,
                      "statistics": "the file's own (ADM reference batch / pytorch-fid layout): Inception-v3 pool_3 "
                                    "mu / sigma" + (", mixed_6/conv mu_s / sigma_s" if stats.spatial else "")
                                    + "; no raw features, so no KID or precision / recall"}
    return stats


def _cache_dir() -> Path:
    from twostage.data.fashion_mnist import cache_dir

    return cache_dir() / "reference_stats"


def load_reference_images(ref: ReferenceSpec, image_size: int, resize: str = "pad",
                          max_images: int | None = None, seed: int = 0):
    """The reference split as a torch Dataset of (float [-1,1] CHW image, label), RGB, no augmentation."""
    from twostage.data.build import build_dataset
    from twostage.data.config import DataConfig
    from twostage.data.datasets import SubsetDataset

    cfg = DataConfig(name=ref.dataset, root=ref.root, image_size=image_size, channels=3, resize=resize,
                     flip=False)
    ds = build_dataset(cfg, ref.split)
    if max_images is not None and max_images < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), max_images, replace=False))
        ds = SubsetDataset(ds, idx)
    return ds


def reference_stats(
    spec: str,
    net: FeatureNetwork,
    image_size: int,
    *,
    resize: str = "pad",
    max_images: int | None = None,
    pr_features: int = 10_000,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[ReferenceStats, Path | None]:
    """Statistics of a reference split under `net`, computed once and cached. Returns (stats, path).

    Computing them shows a progress bar (`progress`) and, on a CPU, logs after the first batch how
    long the whole pass will take (10k Fashion-MNIST images through EfficientNet-Lite0 take about
    15 minutes on 2 CPU cores)."""
    if spec.endswith(".npz") and Path(spec).is_file() and ":" not in spec:
        stats = _stats_in_file(Path(spec), net, image_size)
        if stats is not None:
            return stats, Path(spec)
        spec = f"npz:{spec}:train"  # its images, all of them (an .npz has no val split unless one is carved out)
    ref = parse_reference(spec)
    protocol = {
        "reference": ref.text, "dataset": ref.dataset, "root": ref.root, "split": ref.split,
        "image_size": image_size, "resize": resize, "channels": "rgb", "max_images": max_images,
        "precision": precision, **net.protocol(),
    }
    if ref.dataset == "emoji":  # its pixels depend on the sources' versions: another build's statistics are stale
        from twostage.data.emoji import content_id

        protocol["data_build"] = content_id(image_size)
    key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]
    fname = f"{ref.dataset}-{ref.split}-{image_size}px-{net.name}-{precision}-{key}.npz"
    path = Path(cache_dir) / fname if cache_dir else _cache_dir() / fname
    if cache and path.is_file():
        log.info("reference statistics from cache %s", path)
        return ReferenceStats.load(path), path
    ds = load_reference_images(ref, image_size, resize, max_images)
    where = f"cached in {path}, so later evaluations with this protocol reuse them" if cache else "not cached"
    log.info("computing reference statistics of %s (%d images) with %s on %s (%s)", ref.text, len(ds), net.name,
             torch.device(device), where)
    on_cpu = torch.device(device).type == "cpu"

    def estimate(seconds: float, done: int) -> None:  # after the first batch: the whole pass, extrapolated
        if on_cpu and done < len(ds):
            log.info("reference statistics on the CPU: the first %d images took %.1f s, so all %d will take "
                     "about %s; computed once, then %s", done, seconds, len(ds),
                     _duration(seconds * len(ds) / done), where)

    feats = extract_features(net, _reference_batches(ds, batch_size, estimate), batch_size, device, precision,
                             keys=("pool", "spatial"), progress=progress, total=len(ds),
                             desc=f"reference {ref.text}")
    protocol["num_images"] = int(feats["pool"].shape[0])
    pool = feature_stats(feats["pool"].numpy(), protocol)
    spatial = feature_stats(feats["spatial"].numpy(), protocol) if "spatial" in feats else None
    n = feats["pool"].shape[0]
    pick = np.sort(np.random.default_rng(0).choice(n, min(n, pr_features), replace=False))
    stats = ReferenceStats(pool, spatial, feats["pool"].numpy()[pick].astype(np.float32), protocol)
    if cache:
        stats.save(path)
        log.info("cached reference statistics in %s", path)
    return stats, (path if cache else None)


def _reference_batches(ds, batch_size: int, after_first=None):
    """The reference images in batches; `after_first(seconds, images)` runs once the consumer has
    finished with the first batch (loading + features), i.e. when it asks for the second."""
    start = time.perf_counter()
    for j in range(0, len(ds), batch_size):
        yield torch.stack([ds[i][0] for i in range(j, min(j + batch_size, len(ds)))])
        if j == 0 and after_first is not None:
            after_first(time.perf_counter() - start, min(batch_size, len(ds)))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _check_network(protocol: dict, net: FeatureNetwork, where: str | Path) -> None:
    """Statistics from different feature networks (or weights) are not comparable: refuse them. The weights'
    checksum decides where the file records one, else the network's name."""
    name, checksum = protocol.get("feature_network"), protocol.get("feature_checksum")
    if checksum != net.checksum if checksum else (name and name != net.name):
        raise ReferenceStatsError(f"{where} holds statistics of {name} (weights {str(checksum)[:12]}), but the "
                                  f"feature network asked for is {net.name} (weights {net.checksum[:12]}); compute "
                                  f"its own with `twostage eval stats REF --network ...` or give the reference "
                                  f"images")
