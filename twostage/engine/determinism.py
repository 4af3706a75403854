"""`train.deterministic`: the same run twice, bit for bit, on one machine and software stack.

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


__all__ = ["deterministic"]
