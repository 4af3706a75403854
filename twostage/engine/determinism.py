"""`train.deterministic` and `train.cudnn_benchmark`: which kernels the training loop may use.

`train.cudnn_benchmark` (default: on unless deterministic) lets cuDNN time its convolution algorithms
for each new input shape and keep the fastest. Training shapes are fixed, so the timing is paid once per
shape; without it cuDNN picks by heuristics, which for bf16 NHWC convolutions of small images need not
be the fastest. It changes which algorithm runs, so rounding differs from run to run (as atomic adds
already make it differ, below); it is off when `train.deterministic` is on.

`train.deterministic`: the same run twice, bit for bit, on one machine and software stack.

Without it a CUDA run is not a function of its seed: kernels that accumulate with atomic adds (the
backward passes of convolutions and embeddings, scatter / index_add, some reductions) add in whatever
order the threads arrive, and autotuned kernels may change between runs. On an H200 two runs of one
tokenizer configuration and seed differed after 2000 steps by up to 1.7 rFD and 1.2 dB PSNR, as much as
two seeds (results/study_crt_paired_tokenizer_rerun). That spread is real variation a study should
sample, so studies leave this off; turn it on to tell a code change from that noise.

On, for the training loop only (the settings are process-wide, so the previous ones come back after):
torch.use_deterministic_algorithms(True) (an op with no deterministic kernel raises a RuntimeError that
names it), cuDNN in deterministic mode without autotuning, and CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS
needs a fixed workspace to be deterministic; set before the process's first cuBLAS call, i.e. before
training: a process that already ran matmuls keeps its workspace, and torch then raises).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


@contextlib.contextmanager
def kernel_settings(deterministic_kernels: bool, cudnn_benchmark: bool | None) -> Iterator[None]:
    """The training loop's kernel settings inside the block (cudnn_benchmark None: on unless
    deterministic; TrainConfig.check refuses true with deterministic); the process's previous settings
    after."""
    benchmark = (not deterministic_kernels) if cudnn_benchmark is None else cudnn_benchmark
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        with deterministic(deterministic_kernels):
            yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def without_autotuning() -> Iterator[None]:
    """cuDNN picks convolution algorithms by heuristics inside the block (the previous setting after).
    For work that meets its shapes once or a few times, such as a checkpoint's validation and previews
    with the feature network at 224 px: autotuning times every algorithm of every new shape, paid by
    each process at its first checkpoint and never amortized."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block when `enabled`; the process's previous settings after."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]
        if previous[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


__all__ = ["deterministic", "kernel_settings", "without_autotuning"]
