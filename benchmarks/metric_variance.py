"""How much FD@N, FD_inf and KID move on repeated evaluation of one "model".

    python benchmarks/metric_variance.py                                  # 5 x 2000 test images vs all 60k train
    python benchmarks/metric_variance.py --device cpu --ref-max-images 2000 --test-max-images 1500 \
        --subsets 3 --subset-size 500                                  # a few minutes on 2 CPU cores

The "model" is the data itself: its samples are real Fashion-MNIST test images, so a perfect
generator, and each repeated evaluation is a disjoint subset of `--subset-size` test images (`--subsets`
of them, drawn with `--seed`) scored against the statistics of the train split (its first
`--ref-max-images` images, seeded, as `eval gen --ref-max-images`). For each subset it computes what
`twostage eval gen` reports (twostage/metrics/generation.py, same defaults): FD-<net> with its
centered bootstrap interval, FDinf-<net> with its regression stderr, KID-<net> with its stderr; then
the mean and standard deviation over subsets, which is the spread a user sees when evaluating one
model twice with fresh samples, next to the error bars each single evaluation claims.

Features: EfficientNet-Lite0 pool features (1280-d) through the library's reference statistics,
cached (`$TWOSTAGE_CACHE/reference_stats`): the test split's statistics file keeps all 10k raw pool
features (it keeps up to 10k for precision/recall and KID), which are the samples here. On 2 CPU
cores each 10k images take about 15 minutes to extract once; the estimators then take seconds to a
minute per subset (timed and printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostage.backbones import load_feature_network  # noqa: E402
from twostage.metrics import generation as gen  # noqa: E402
from twostage.metrics.frechet import feature_stats, frechet_distance, psd_sqrt  # noqa: E402
from twostage.metrics.protocol import device_description, metric_name  # noqa: E402
from twostage.metrics.reference import reference_stats  # noqa: E402
from twostage.metrics.unbiased import bootstrap_fd, fd_infinity, kid  # noqa: E402


def evaluate(x: np.ndarray, ref, ref_sqrt: np.ndarray, args: argparse.Namespace) -> tuple[dict, dict]:
    """FD, its centered bootstrap interval, FD_inf and KID of one sample set, as eval gen computes them."""
    row, seconds = {}, {}
    t = time.perf_counter()
    s = feature_stats(x)
    row["fd"] = frechet_distance(s.mu, s.sigma, ref.pool.mu, ref.pool.sigma)
    seconds["fd"] = time.perf_counter() - t
    if args.bootstrap > 0:
        t = time.perf_counter()
        b = bootstrap_fd(x, ref.pool.mu, ref.pool.sigma, num_resamples=args.bootstrap, seed=args.seed,
                         ref_sigma_sqrt=ref_sqrt)
        row["fd_low"], row["fd_high"] = b.centered
        row["fd_boot_std"], row["fd_boot_bias"] = b.std, b.bias
        seconds["bootstrap"] = time.perf_counter() - t
    t = time.perf_counter()
    frac = gen.default_fdinf_min_fraction(*x.shape)
    r = fd_infinity(x, ref.pool.mu, ref.pool.sigma, num_sizes=gen.FDINF_NUM_SIZES, min_fraction=frac, seed=args.seed,
                    ref_sigma_sqrt=ref_sqrt)
    row["fdinf"], row["fdinf_stderr"], row["fdinf_sizes"] = r.fd_inf, r.stderr, list(r.sizes)
    seconds["fdinf"] = time.perf_counter() - t
    if args.kid_subsets > 0:
        t = time.perf_counter()
        k = kid(x, ref.pr_features, num_subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed)
        row["kid"], row["kid_stderr"] = k.mean, k.stderr
        seconds["kid"] = time.perf_counter() - t
    return row, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subsets", type=int, default=5, help="disjoint sample sets (repeated evaluations)")
    ap.add_argument("--subset-size", type=int, default=2000, help="samples per evaluation (N)")
    ap.add_argument("--ref-max-images", type=int, help="train images in the reference statistics (default all 60k)")
    ap.add_argument("--test-max-images", type=int,
                    help="test images to draw the subsets from (default all 10k; fewer: faster on a CPU)")
    ap.add_argument("--kid-subsets", type=int, default=gen.KID_SUBSETS)
    ap.add_argument("--kid-subset-size", type=int, default=gen.KID_SUBSET_SIZE)
    ap.add_argument("--bootstrap", type=int, default=gen.BOOTSTRAP_RESAMPLES, help="FD bootstrap resamples (0: off)")
    ap.add_argument("--seed", type=int, default=0, help="draws the subsets; seeds every estimator")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--cache-dir", help="reference statistics cache (default $TWOSTAGE_CACHE/reference_stats)")
    ap.add_argument("--out", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    t0 = time.perf_counter()
    net = load_feature_network("effnet-lite0").to(device)
    common = dict(batch_size=args.batch_size, device=device, precision=args.precision, cache_dir=args.cache_dir)
    ref, ref_path = reference_stats("fashion-mnist:train", net, 32, max_images=args.ref_max_images, **common)
    test, test_path = reference_stats("fashion-mnist:test", net, 32, max_images=args.test_max_images, **common)
    pool = np.asarray(test.pr_features, np.float64)  # all (<= 10k) test pool features, in dataset order
    need = args.subsets * args.subset_size
    if len(pool) < need:
        ap.error(f"{args.subsets} x {args.subset_size} = {need} samples, but the test split has {len(pool)}")
    features_s = time.perf_counter() - t0
    perm = np.random.default_rng(args.seed).permutation(len(pool))
    ref_sqrt = psd_sqrt(ref.pool.sigma)

    rows, times = [], []
    for i in range(args.subsets):
        row, seconds = evaluate(pool[perm[i * args.subset_size:(i + 1) * args.subset_size]], ref, ref_sqrt, args)
        rows.append(row)
        times.append(seconds)
        interval = f" [{row['fd_low']:.4f}, {row['fd_high']:.4f}]" if "fd_low" in row else ""
        print(f"subset {i}: FD {row['fd']:.4f}{interval}  FDinf {row['fdinf']:.4f} +- {row['fdinf_stderr']:.4f}  "
              f"KID {1e3 * row.get('kid', np.nan):.4f}e-3 +- {1e3 * row.get('kid_stderr', np.nan):.4f}e-3  "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in seconds.items())})", flush=True)
    full, _ = evaluate(pool, ref, ref_sqrt, argparse.Namespace(**{**vars(args), "bootstrap": 0}))

    net_name = net.name
    names = {"fd": metric_name("fd", net_name), "fdinf": metric_name("fdinf", net_name),
             "kid": metric_name("kid", net_name)}
    summary = {}
    print()
    print(f"{args.subsets} disjoint sets of N = {args.subset_size} Fashion-MNIST test images vs the train split "
          f"({ref.pool.n} images); {net_name} pool features, D = {pool.shape[1]}; {device_description(device)}")
    print(f"{'metric':<20} {'mean':>10} {'std':>10} {'std/mean':>9} {'claimed':>10}  claimed = mean per-evaluation "
          f"error bar")
    for key, claim, what in (("fd", "fd_boot_std", "bootstrap std"), ("fdinf", "fdinf_stderr", "regression stderr"),
                             ("kid", "kid_stderr", "KID stderr")):
        if key not in rows[0]:
            continue
        v = np.array([r[key] for r in rows])
        c = float(np.mean([r[claim] for r in rows])) if claim in rows[0] else float("nan")
        summary[names[key]] = {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std(ddof=1)),
                               "claimed_error": c, "claimed_error_is": what, f"all_{len(pool)}": full[key]}
        scale = 1e3 if key == "kid" else 1.0
        print(f"{names[key] + (' x1e3' if key == 'kid' else ''):<20} {scale * v.mean():>10.4f} "
              f"{scale * v.std(ddof=1):>10.4f} {v.std(ddof=1) / abs(v.mean()):>9.3f} {scale * c:>10.4f}  ({what}); "
              f"on all {len(pool)}: {scale * full[key]:.4f}")
    if "fd_low" in rows[0]:
        inside = sum(r["fd_low"] <= summary[names["fd"]]["mean"] <= r["fd_high"] for r in rows)
        half = float(np.mean([(r["fd_high"] - r["fd_low"]) / 2 for r in rows]))
        bias = float(np.mean([r["fd_boot_bias"] for r in rows]))
        print(f"FD bootstrap: mean half-width {half:.4f}, bias {bias:.4f}; the mean FD over subsets lies in "
              f"{inside}/{len(rows)} centered intervals")
        summary[names["fd"]].update(mean_half_width=half, mean_bootstrap_bias=bias, mean_inside=inside)
    mean_times = {k: float(np.mean([t[k] for t in times])) for k in times[0]}
    print("seconds per evaluation: " + ", ".join(f"{k} {v:.2f}" for k, v in mean_times.items())
          + f"; features (extracted or cached) {features_s:.0f} s")
    if args.out:
        doc = {"summary": summary, "rows": rows, "seconds_per_evaluation": mean_times, "features_seconds": features_s,
               "settings": {**vars(args), "device": device_description(device), "network": net_name,
                            "feature_checksum": net.checksum, "reference": str(ref_path), "samples": str(test_path),
                            "fdinf_min_fraction": gen.default_fdinf_min_fraction(args.subset_size, pool.shape[1]),
                            "fdinf_num_sizes": gen.FDINF_NUM_SIZES},
               "command": "python benchmarks/metric_variance.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
