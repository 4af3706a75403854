"""What every generator writes: sample files, preview grids, with balanced labels, decoded by its tokenizer.

Labels (`sample_labels`, the same for every kind): "balanced" (equal counts per class, the default: the
Fashion-MNIST test split that is its FD reference is balanced) or "train" (the class proportions of
the generator's training cache, recorded as train_label_counts in RUN/model.json: for data whose
classes are unequal, e.g. emoji, whose reference split has the training proportions). Either way they
are stored grouped by class, so grids and files keep one layout.

Samples file, in the layout of the ADM evaluator (guided-diffusion's `evaluations/evaluator.py` reads
`np.load(f)["arr_0"]`), so the field's tools score it as it is:

    FILE.npz   arr_0    uint8 (N, H, W, 3) images (empty, (0, 0, 0, 3), when sampled with tokens_only)
               arr_1    int64 (N,) class labels
               tokens   (N, h, w) code ids (discrete generators; int32)
               protocol JSON string: sampler, steps, cfg scale / interval, seed, precision, labels
    FILE.json  {"protocol": ..., "run": ..., "timing": ...}  (the same record, readable)
    FILE.png   a grid with one row per class

It is read by `twostage.metrics.generation.load_samples` (`twostage eval gen`), which also reads files
written before the switch (images under `images`, labels under `labels`; twostage.data.datasets.npz_keys).

The three files are written to hidden temporary names first and renamed into place together, so a
failed write (a full disk) or a kill leaves the previous samples file, its record and grid as they
were, and no partial file behind. Sampling shows a progress bar with images/s on stderr when stderr is
a terminal (`sampling_progress`).

Images come from the stage-1 tokenizer that made the generator's training cache, loaded through the
kind-independent `twostage.tokenizers.base.load_tokenizer`; its `decode` takes what the generator
produces (token ids (N, h, w) or latents (N, d, h, w)) and returns images in [-1, 1].
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from twostage.common.errors import UserError
from twostage.config import ConfigError
from twostage.generators.commands import LABEL_SAMPLING  # the choices, kept where the CLI reads them

log = logging.getLogger(__name__)

Decoder = Callable[[torch.Tensor], torch.Tensor]  # generator output -> images (N, C, H, W) in [-1, 1]


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """n class labels with equal counts per class, grouped by class: [0, 0, .., 1, 1, ..].

    Generation metrics compare against a class-balanced reference set, so samples are drawn with
    balanced labels rather than at random. When n is not a multiple of num_classes the first
    n % num_classes classes get one more.
    """
    if n < 0 or num_classes <= 0:
        raise ValueError(f"need n >= 0 and num_classes > 0, got {n}, {num_classes}")
    return np.sort(np.arange(n, dtype=np.int64) % num_classes, kind="stable")


def proportional_labels(n: int, counts: Sequence[int]) -> np.ndarray:
    """n class labels in the proportions of `counts` (one count per class), grouped by class like
    balanced_labels.

    Largest remainder: class c gets floor(n * counts[c] / total) and the labels left over go one each
    to the classes with the largest remainders, ties to the lower class. Exact integer arithmetic, so
    it is deterministic: the total is n, each class is within one of its exact share n * counts[c] /
    total, a class with count 0 gets none, and equal counts give balanced_labels(n, len(counts)).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if n < 0 or counts.ndim != 1 or len(counts) == 0 or (counts < 0).any() or counts.sum() == 0:
        raise ValueError(f"need n >= 0 and non-negative counts, not all 0, got {n}, {counts.tolist()}")
    total = int(counts.sum())
    share = [n * int(c) for c in counts]  # python ints: n * count cannot overflow
    alloc = np.array([s // total for s in share], dtype=np.int64)
    remainder = np.array([s % total for s in share], dtype=np.int64)
    left = n - int(alloc.sum())
    order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder first, then lower class
    alloc[order[:left]] += 1
    return np.repeat(np.arange(len(counts), dtype=np.int64), alloc)


def sample_labels(n: int, num_classes: int, labels: str, info: Mapping[str, Any],
                  run: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(the n labels a generator run samples, what its samples protocol records of them).

    labels: "balanced" or "train"; `info` is the run's model.json record, whose train_label_counts
    (written when the run trained, twostage/generators/runs.py) give the training proportions, so
    the cache need not be present at sample time.
    """
    if labels not in LABEL_SAMPLING:
        raise ConfigError(f"labels={labels!r} (--labels): choose balanced (equal counts per class) or train "
                          "(the class proportions of the run's training cache)")
    if labels == "balanced":
        return balanced_labels(n, num_classes), {"label_sampling": "balanced"}
    counts = info.get("train_label_counts")
    if counts is None:
        raise UserError(f"{run}/model.json records no train_label_counts (the run was trained or converted before "
                        "they were recorded), so --labels train cannot be drawn: re-run its `twostage generator "
                        "train` command with the same --tokens cache (it resumes at its last step and records "
                        "them), or sample with --labels balanced")
    if len(counts) != num_classes:
        raise UserError(f"{run}/model.json: train_label_counts has {len(counts)} classes but the model has "
                        f"{num_classes}; re-run its `twostage generator train` command to record them again, "
                        "or sample with --labels balanced")
    return proportional_labels(n, counts), {"label_sampling": "train", "train_label_counts": [int(c) for c in counts]}


def save_image_grid(images: torch.Tensor | np.ndarray, path: Path, nrow: int | None = None) -> Path:
    """A PNG grid of float [-1, 1] NCHW tensors or uint8 NHWC arrays."""
    from twostage.common.images import save_grid

    if isinstance(images, np.ndarray):  # uint8 NHWC -> float NCHW, exactly invertible
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return save_grid(images.float().cpu(), path, nrow)


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray, protocol: dict[str, Any],
                 tokens: np.ndarray | None = None, extra: dict[str, Any] | None = None, grid: int = 64) -> Path:
    """Write FILE.npz, FILE.json and FILE.png (up to `grid` samples, a row per class; 0 = none), all or none: each goes
    to a temporary name first, and only when all three are written are they renamed into place.

    `images` must already be uint8 (N, H, W, 3): the file promises the ADM layout to tools that do not
    check it, so anything else is refused here rather than written."""
    from twostage.engine.checkpoint import DiskFullError, is_disk_full

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"samples must be uint8 (N, H, W, 3) images, got {images.dtype} of shape {images.shape}")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images, "arr_1": labels.astype(np.int64), "protocol": np.array(json.dumps(protocol))}
    if tokens is not None:
        arrays["tokens"] = tokens.astype(np.int32)
    targets = [path, path.with_suffix(".json")] + ([path.with_suffix(".png")] if grid > 0 and len(images) else [])
    tmp = {t: t.with_name(f".{t.stem}.tmp-{os.getpid()}{t.suffix}") for t in targets}
    try:
        np.savez(tmp[targets[0]], **arrays)
        tmp[targets[1]].write_text(json.dumps({"protocol": protocol, **(extra or {})}, indent=2))
        if len(targets) > 2:
            rows, nrow = grid_by_class(labels, grid)
            save_image_grid(images[rows], tmp[targets[2]], nrow)
        for target in targets:
            os.replace(tmp[target], target)
    except BaseException as err:
        for t in tmp.values():
            t.unlink(missing_ok=True)
        if is_disk_full(err):
            kept = "the samples file there before is unchanged" if path.exists() else "nothing was written"
            raise DiskFullError(f"no space left on the device of {path} ({err.strerror or err}); {kept}. Free "
                                f"some space (the samples take about {_megabytes(arrays):.0f} MB) and sample "
                                "again", err.errno) from err
        raise
    return path


def grid_by_class(labels: np.ndarray, grid: int) -> tuple[np.ndarray, int]:
    """(indices, per_row) of at most `grid` samples, one row per class, as many per class as fit:
    balanced samples are stored grouped by class, so the first `grid` would show only the first class."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = max(1, min(grid // max(1, len(classes)), int(counts.min())))  # full rows: one class each
    rows = [np.flatnonzero(labels == c)[:per_class] for c in classes[: max(1, grid // per_class)]]
    return np.concatenate(rows), per_class


def _megabytes(arrays: dict[str, np.ndarray]) -> float:
    return sum(a.nbytes for a in arrays.values()) / 2**20


def sampling_progress(total: int, desc: str = "sampling"):
    """A progress bar over the `total` images being sampled, with the rate in images/s, on stderr;
    shown only when stderr is a terminal (logs and tests stay quiet). Update it with the images done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None, file=sys.stderr)


def load_decoder(tokenizer_run: str | Path, device: torch.device | str, expected_checksum: str = "") -> Any:
    """The tokenizer of `tokenizer_run` (any kind), warning when its weights are not those that made
    the generator's training cache (`expected_checksum`, from model.json).

    Imported lazily: the tokenizer package is only needed when images are wanted.
    """
    from twostage.tokenizers.base import load_tokenizer

    tok = load_tokenizer(tokenizer_run, device=device)
    checksum = getattr(tok, "checksum", "")
    if checksum and expected_checksum and checksum != expected_checksum:
        log.warning("the tokenizer's weights (sha256 %s) differ from those that made the training cache (%s)",
                    checksum[:12], expected_checksum[:12])
    return tok


class LazyDecoder:
    """The decoder of checkpoint sample grids, made on the first checkpoint that draws one.

    `factory(device)` returns a Decoder (default: the cache's tokenizer's `decode`). A failure (no
    tokenizer run at that path, another machine) warns once and turns grids off: a missing tokenizer
    must not stop training.
    """

    def __init__(self, factory: Callable[[torch.device], Decoder | None]):
        self.factory = factory
        self._decoder: Decoder | None = None
        self._tried = False

    @classmethod
    def from_tokenizer_run(cls, tokenizer_run: str, checksum: str = "") -> LazyDecoder:
        """The `decode` of the tokenizer run that made the cache (none when the cache names no run)."""
        return cls(lambda device: load_decoder(tokenizer_run, device, checksum).decode if tokenizer_run else None)

    def __call__(self, device: torch.device) -> Decoder | None:
        if not self._tried:
            self._tried = True
            try:
                self._decoder = self.factory(device)
            except Exception as err:  # noqa: BLE001 - any failure only costs the grids
                log.warning("no sample grids at checkpoints: cannot load the cache's tokenizer (%s)", err)
        return self._decoder


__all__ = ["Decoder", "balanced_labels", "LABEL_SAMPLING", "proportional_labels", "sample_labels", "save_image_grid", "save_samples", "sampling_progress", "load_decoder",
           "LazyDecoder"]
