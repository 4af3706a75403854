"""What the generation metrics cost on a study job's CPU threads, and numpy vs torch for the same code.

    python benchmarks/bench_metrics_cpu.py                       # 10k x 1280 features, 2 threads
    python benchmarks/bench_metrics_cpu.py --n 2000 --threads 16

A study job evaluates 10k samples against 10k reference features of EfficientNet-Lite0 (D = 1280) with
the threads it is given (16 cores / 8 jobs = 2 on the H200 host). This times frechet_distance,
fd_infinity and kid (twostage/metrics/unbiased.py) on Gaussian features of that shape, on the CPU:
once as the library runs them there (numpy arrays), once with the estimators' arrays forced to torch
tensors on the CPU (the code path a CUDA device takes, here without a GPU), to compare the two array
libraries on one machine. Prints seconds per call and the values (equal up to rounding).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kid-subsets", type=int, default=100)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy's BLAS starts its pool

    import numpy as np
    import torch

    from twostage.metrics import unbiased
    from twostage.metrics.frechet import feature_stats, frechet_distance

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    ref = (rng.standard_normal((args.n, args.dim)) * 1.1).astype(np.float32)
    s_ref, s_x = feature_stats(ref), feature_stats(x)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, numpy {np.__version__}, N = {args.n}, D = {args.dim}, "
          f"date {time.strftime('%Y-%m-%d')}")

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return time.perf_counter() - start, value

    t, fd = timed(lambda: frechet_distance(s_x.mu, s_x.sigma, s_ref.mu, s_ref.sigma))
    print(f"{'frechet_distance':18s} numpy {t:7.2f} s  ({fd:.6f})")
    numpy_f64 = unbiased._f64
    for path in ("numpy", "torch"):
        if path == "torch":
            unbiased._f64 = lambda a, device: torch.as_tensor(np.asarray(a, np.float64))
        t_inf, r = timed(lambda: unbiased.fd_infinity(x, s_ref.mu, s_ref.sigma))
        t_kid, k = timed(lambda: unbiased.kid(x, ref, num_subsets=args.kid_subsets))
        print(f"{'fd_infinity':18s} {path} {t_inf:7.2f} s  ({r.fd_inf:.6f})")
        print(f"{'kid':18s} {path} {t_kid:7.2f} s  ({k.mean:.6e}, {args.kid_subsets} subsets)")
    unbiased._f64 = numpy_f64
    return 0


if __name__ == "__main__":
    sys.exit(main())
