"""Generation metrics with less bias, or with their own error bar, at a fixed sample count N.

FD from N samples is biased upward: the covariance estimated from N samples is noisy, and the noise
enters tr(S) - 2 tr((S S_ref)^{1/2}) with a positive sign to first order, so E[FD_N] = FD + k / N + ...
with k depending on the model. Two models compared at one N therefore differ by k_A/N - k_B/N as
well as by their FD (Chong & Forsyth, arXiv:1911.07023). Three remedies live here:

    fd_infinity(features, ref_mu, ref_sigma)  FD at several subset sizes, extrapolated to N = inf
    kid(features, ref_features)               unbiased MMD^2, cubic polynomial kernel (arXiv:1801.01401)
    bootstrap_fd(features, ref_mu, ref_sigma) the spread of FD over resamples of the generated set

The reference statistics stay fixed throughout: the reference set is shared by every model of a
study, so its own sampling error shifts all of them alike and does not decide a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from twostage.metrics.frechet import feature_stats, frechet_distance, psd_sqrt

__all__ = ["FDInfinity", "fd_infinity", "KID", "kid", "FDBootstrap", "bootstrap_fd"]

Seed = int | np.random.Generator
Device = str | torch.device


def _f64(a, device: Device):
    """float64 where the estimators' products and eigensolves run: a torch tensor on a CUDA device (KID's
    100 kernel matrices and FD_inf's Gram matrices took 14 s at N = 10k on the 2 CPU threads a study job
    gets, while its GPU idles), else a numpy array (on 2 CPU cores numpy ran KID in 8.6 s, torch in 12.1 s;
    results/throughput/2026-12-02/metrics_cpu.txt).
    The code below is written once for both (operators and methods they share); draws stay in numpy,
    so every device sees the same subsets and gives the same values up to rounding."""
    if torch.device(device).type == "cuda":
        return torch.as_tensor(np.asarray(a, np.float64) if not isinstance(a, torch.Tensor) else a,
                               dtype=torch.float64).to(device)
    return np.asarray(a.cpu().numpy() if isinstance(a, torch.Tensor) else a, np.float64)


def _eigvalsh(m):
    return torch.linalg.eigvalsh(m) if isinstance(m, torch.Tensor) else np.linalg.eigvalsh(m)


def _rows(a, index: np.ndarray):
    """a[index] for a numpy array or a tensor (the index moved to the tensor's device first)."""
    return a[torch.as_tensor(index, device=a.device)] if isinstance(a, torch.Tensor) else a[index]


def _check_reference(mu: np.ndarray, ref_mu, ref_sigma) -> tuple[np.ndarray, np.ndarray]:
    ref_mu, ref_sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    if ref_mu.shape != mu.shape or ref_sigma.shape != (mu.size, mu.size):
        raise ValueError(f"reference statistics {ref_mu.shape}/{ref_sigma.shape} do not match {mu.size}-d features")
    return ref_mu, ref_sigma


@dataclass(frozen=True)
class FDInfinity:
    """FD extrapolated to infinitely many samples. `low`/`high`: t-interval of the intercept."""

    fd_inf: float
    slope: float  # k in FD(N) = FD_inf + k / N
    sizes: tuple[int, ...]  # N of every subset draw, in draw order
    fds: tuple[float, ...]  # FD of every subset draw
    stderr: float  # standard error of fd_inf from the regression (nan with only two points)
    low: float
    high: float
    confidence: float


def fd_infinity(features, ref_mu, ref_sigma, *, sizes=None, num_sizes: int = 5, min_fraction: float = 0.1,
                repeats: int = 1, confidence: float = 0.95, seed: Seed = 0,
                ref_sigma_sqrt: np.ndarray | None = None, device: Device = "cpu") -> FDInfinity:
    """FD_inf of Chong & Forsyth (arXiv:1911.07023): FD of random subsets (drawn without
    replacement) of `features` at sizes N_i, then least squares FD(N_i) = FD_inf + k / N_i.

    Default sizes: `num_sizes` values spaced linearly in N from min_fraction * N to N, as the paper
    does (5k..50k). Linear spacing beat spacing evenly in 1/N on Gaussian features (D = 64, N = 2000,
    60 sets): RMSE of FD_inf 0.089 vs 0.115. FD's variance and its deviation from the 1/N law (terms
    in 1/N^2) both grow as N shrinks, and even 1/N spacing puts most points at small N.
    `repeats` draws per size (the full set only once: all its draws are equal).

    The interval is the regression's (OLS, Student t with points - 2 degrees of freedom): how
    precisely these subset FDs pin down the intercept. It does not include the sampling error of the
    generated set itself: every subset comes from the same set, so a set that happens to lie far from
    its distribution moves all points alike. For that, repeat seeds (twostage.study.stats) or see
    bootstrap_fd. Keep min_fraction * N well above the feature dimension D, or 1/N^2 terms bend the
    line and the interval, which cannot see that, is too narrow: D = 1280, N = 5000, true FD 3.2,
    FD_N 18.4: min_fraction 0.1 gave FD_inf -4.8 (stderr 2.3), 0.3 gave 1.5 (0.4), 0.5 gave 2.5 (0.1).

    Each subset's FD comes from _FixedReferenceFD (one square root of ref_sigma for all of them; pass
    it as `ref_sigma_sqrt` = psd_sqrt(ref_sigma) when it is already at hand).
    """
    s = feature_stats(features)
    x = np.asarray(features, np.float64)
    ref_mu, ref_sigma = _check_reference(s.mu, ref_mu, ref_sigma)
    n = len(x)
    if sizes is None:
        low_n = max(2, int(np.ceil(min_fraction * n)))
        sizes = np.linspace(low_n, n, num_sizes)
    sizes = sorted({int(round(v)) for v in sizes})
    if len(sizes) < 2 or sizes[0] < 2 or sizes[-1] > n:
        raise ValueError(f"sizes {sizes} must hold two or more distinct values in [2, {n}]")
    rng = np.random.default_rng(seed)
    subset_fd = _FixedReferenceFD(x, ref_mu, ref_sigma, ref_sigma_sqrt, device)  # one root of ref_sigma for all
    drawn, fds = [], []
    for size in sizes:
        for _ in range(1 if size == n else repeats):
            member = np.zeros(n, np.int64)
            member[rng.choice(n, size, replace=False)] = 1
            drawn.append(size)
            fds.append(subset_fd(member))
    design = np.column_stack([np.ones(len(drawn)), 1.0 / np.asarray(drawn, np.float64)])
    y = np.asarray(fds)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(y) - 2
    if dof > 0:
        resid = y - design @ beta
        cov = float(resid @ resid) / dof * np.linalg.inv(design.T @ design)  # s^2 (X^T X)^{-1}
        stderr = float(np.sqrt(cov[0, 0]))
        half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * stderr
    else:
        stderr = half = float("nan")
    return FDInfinity(float(beta[0]), float(beta[1]), tuple(drawn), tuple(float(v) for v in fds), stderr,
                      float(beta[0] - half), float(beta[0] + half), confidence)


@dataclass(frozen=True)
class KID:
    """Kernel Inception Distance (named for its feature network like FD: KID-<net>)."""

    mean: float  # average of the per-subset unbiased MMD^2 estimates
    std: float  # their standard deviation over subsets (ddof=1; 0 with one subset)
    stderr: float  # std / sqrt(num_subsets): the Monte-Carlo error of the average
    num_subsets: int
    subset_size: int


def _cubic_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1.0) ** 3  # k(x, y) = (x.y / d + 1)^3


def _mmd2_unbiased(x, y) -> float:
    # MMD^2_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2
    # (arXiv:1801.01401, with equal sample sizes); the diagonal terms k(x_i, x_i) are what FD-like
    # plug-in estimates keep and what makes them biased.
    m = len(x)
    kxx, kyy = _cubic_kernel(x, x), _cubic_kernel(y, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * _cubic_kernel(x, y).mean())


def kid(features, ref_features, *, num_subsets: int = 100, subset_size: int = 1000, seed: Seed = 0,
        device: Device = "cpu") -> KID:
    """KID (Binkowski et al., arXiv:1801.01401): the unbiased MMD^2 between generated and reference
    features with the cubic polynomial kernel, averaged over `num_subsets` random subsets of
    `subset_size` from each side (drawn without replacement within a subset, independently across
    subsets; subset_size is capped at the smaller set). Unbiased at any N, so models evaluated with
    different sample counts stay comparable, and it can come out slightly negative for equal laws.
    The kernels are computed in float64 on `device`.

    `stderr` treats the subsets as independent; when num_subsets * subset_size exceeds the set sizes
    they overlap, and it then describes the averaging only, not how KID varies with a new sample set."""
    x, y = np.asarray(features), np.asarray(ref_features)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need (N, D) feature matrices of one D, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2 or num_subsets < 1:
        raise ValueError(f"need subsets of >= 2 samples (got {m}) and num_subsets >= 1 (got {num_subsets})")
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)) for _ in range(num_subsets)]
    xd, yd = _f64(x, device), _f64(y, device)
    values = np.array([_mmd2_unbiased(_rows(xd, i), _rows(yd, j)) for i, j in draws])
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return KID(float(values.mean()), std, std / float(np.sqrt(num_subsets)), num_subsets, m)


@dataclass(frozen=True)
class FDBootstrap:
    """FD of the full generated set and its spread over resamples (with replacement) of that set."""

    fd: float  # FD of all samples, as frechet_distance gives it
    low: float  # percentile interval of the resampled FDs
    high: float
    std: float  # standard deviation of the resampled FDs
    bias: float  # mean of the resampled FDs - fd
    num_resamples: int
    confidence: float

    @property
    def centered(self) -> tuple[float, float]:
        """The percentile interval moved by -bias: the same spread, around the measured fd. Where a
        repeat evaluation's FD (new samples, same N) would fall; it contains fd by construction."""
        return self.low - self.bias, self.high - self.bias


class _FixedReferenceFD:
    """FD of count-weighted resamples (or subsets: counts 0/1) of one feature set against fixed
    reference statistics.

    Precomputes A = ref_sigma^{1/2} and Y = (X - mean) A once. A resample with counts c (sum n) has
    mean shift d = c.Xc / n and A S A = Z^T Z with rows z_i = sqrt(c_i / (n-1)) (y_i - A d), so
    tr((S ref_sigma)^{1/2}) = sum sqrt(eig(Z Z^T or Z^T Z, the smaller)) (the eigen trick of frechet.py):
    one O(N D^2) product and one symmetric eigensolve per resample, no square root of S.

    With N <= D every Z Z^T is the smaller matrix, and Z Z^T = W^{1/2} (Xc - d) ref_sigma (Xc - d)^T
    W^{1/2} (W = diag(c) / (n-1)) needs no square root of ref_sigma at all: P = Xc ref_sigma Xc^T is
    precomputed, and each resample double-centres its rows and columns of P."""

    def __init__(self, x: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                 ref_sigma_sqrt: np.ndarray | None = None, device: Device = "cpu"):
        self.device = device
        x = _f64(x, device)
        mu = x.mean(0)
        self.n = len(x)
        self.xc = x - mu
        self.offset = mu - _f64(ref_mu, device)
        if self.n <= x.shape[1] and ref_sigma_sqrt is None:
            self.p, self.y = self.xc @ _f64(ref_sigma, device) @ self.xc.T, None
        else:
            root = psd_sqrt(ref_sigma) if ref_sigma_sqrt is None else ref_sigma_sqrt
            self.p, self.y = None, self.xc @ _f64(root, device)
        self.sq = (self.xc * self.xc).sum(1)
        self.tr_ref = float(np.trace(ref_sigma))

    def __call__(self, counts: np.ndarray) -> float:
        keep = np.flatnonzero(counts > 0)
        c = _f64(counts[keep], self.device)
        n = float(counts.sum())  # N for a bootstrap resample, the subset size for a subset
        d = c @ _rows(self.xc, keep) / n
        tr_s = (c @ _rows(self.sq, keep) - n * d @ d) / (n - 1)  # sum_i c_i |xc_i - d|^2 / (N-1)
        w = (c / (n - 1)) ** 0.5
        if self.y is None:  # N <= D: the Gram matrix (xc_i - d) ref_sigma (xc_j - d)^T from P
            pk = _rows(_rows(self.p, keep).T, keep).T  # P[keep][:, keep] (P is symmetric)
            q = pk @ c / n  # xc_i ref_sigma d^T
            gram = (pk - q[:, None] - q[None, :] + (c @ q) / n) * (w[:, None] * w[None, :])
        else:
            yk = _rows(self.y, keep)
            z = (yk - c @ yk / n) * w[:, None]
            gram = z @ z.T if z.shape[0] < z.shape[1] else z.T @ z
        tr_cross = float((_eigvalsh(gram).clip(0.0, None) ** 0.5).sum())
        diff = self.offset + d
        return max(float(diff @ diff + tr_s + self.tr_ref - 2.0 * tr_cross), 0.0)


def bootstrap_fd(features, ref_mu, ref_sigma, *, num_resamples: int = 200, confidence: float = 0.95,
                 seed: Seed = 0, ref_sigma_sqrt: np.ndarray | None = None, device: Device = "cpu") -> FDBootstrap:
    """How much FD moves when the generated set is drawn again: FD over `num_resamples` resamples
    of the N generated features with replacement (Efron's bootstrap; resample counts are
    multinomial, so each resample costs one weighted product and one eigensolve, see _FixedReferenceFD).

    Caveat: a resample holds duplicates, which act like fewer samples, so resampled FDs carry FD's
    small-N bias once more: `bias` estimates it (roughly FD's own bias at N, FD_N - FD_inf). When bias is
    not small against high - low, the percentile interval sits above `fd`: use `centered` as fd's
    error bar at this N, and fd_infinity / kid to compare models free of the bias.
    `ref_sigma_sqrt`: psd_sqrt(ref_sigma), when already at hand (it is computed otherwise)."""
    s = feature_stats(features)
    ref_mu, ref_sigma = _check_reference(s.mu, ref_mu, ref_sigma)
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    fd = frechet_distance(s.mu, s.sigma, ref_mu, ref_sigma)
    resampled_fd = _FixedReferenceFD(np.asarray(features, np.float64), ref_mu, ref_sigma, ref_sigma_sqrt, device)
    rng = np.random.default_rng(seed)
    n = s.n
    draws = np.array([resampled_fd(np.bincount(rng.integers(0, n, n), minlength=n)) for _ in range(num_resamples)])
    low, high = np.percentile(draws, [50 * (1 - confidence), 50 * (1 + confidence)])
    return FDBootstrap(fd, float(low), float(high), float(draws.std(ddof=1)), float(draws.mean() - fd),
                       num_resamples, confidence)
