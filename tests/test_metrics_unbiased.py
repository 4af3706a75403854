"""FD_inf, KID and the FD bootstrap (twostage/metrics/unbiased.py) on Gaussian features whose FD is
known in closed form: N(delta, I) against N(0, I) has FD = |delta|^2."""

from __future__ import annotations

import numpy as np
import pytest

from twostage.metrics.frechet import feature_stats, frechet_distance
from twostage.metrics.unbiased import _FixedReferenceFD, bootstrap_fd, fd_infinity, kid


def _gaussian(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    delta = np.zeros(d)
    delta[0] = shift
    return np.random.default_rng(seed).standard_normal((n, d)) + delta


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fd_small_n_is_biased_up_and_fd_infinity_removes_it(seed):
    d, truth = 64, 1.0  # bias of FD at N = 2000 is about d/N + d^2/(4N) = 0.54, its noise about 0.05
    x = _gaussian(2000, d, 1.0, seed)
    r = fd_infinity(x, np.zeros(d), np.eye(d), seed=seed)
    assert r.sizes == (200, 650, 1100, 1550, 2000)  # linear in N from N/10 to N
    assert r.fds[0] > r.fds[-1] > truth + 0.3  # biased upward, more so at small N
    assert r.slope > 0
    assert abs(r.fd_inf - truth) < abs(r.fds[-1] - truth) / 2
    assert r.low < r.fd_inf < r.high and r.stderr > 0


def test_fd_infinity_sizes_repeats_and_errors():
    d = 8
    x = _gaussian(400, d, 0.5, 0)
    r = fd_infinity(x, np.zeros(d), np.eye(d), sizes=[100, 200, 400], repeats=2, seed=0)
    assert r.sizes == (100, 100, 200, 200, 400)  # the full set is drawn once: its draws are all equal
    full = feature_stats(x)
    assert r.fds[-1] == pytest.approx(frechet_distance(full.mu, full.sigma, np.zeros(d), np.eye(d)), rel=1e-9)
    again = fd_infinity(x, np.zeros(d), np.eye(d), sizes=[100, 200, 400], repeats=2, seed=0)
    assert again == r  # seeded
    two = fd_infinity(x, np.zeros(d), np.eye(d), sizes=[200, 400])
    assert np.isnan(two.stderr) and np.isnan(two.low)  # a line through two points has no error estimate
    with pytest.raises(ValueError, match="sizes"):
        fd_infinity(x, np.zeros(d), np.eye(d), sizes=[200, 800])
    with pytest.raises(ValueError, match="reference"):
        fd_infinity(x, np.zeros(d + 1), np.eye(d + 1))


def test_kid_matches_the_unbiased_estimator_written_out():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    r = kid(x, y, num_subsets=3, subset_size=1000)  # capped at 7: every subset is the whole set
    assert r.subset_size == 7 and r.std == pytest.approx(0.0, abs=1e-12)
    assert r.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kid_is_zero_for_equal_laws_and_positive_for_shifted(seed):
    d = 16
    x, y = _gaussian(2000, d, 0.0, seed), _gaussian(2000, d, 0.0, seed + 100)
    same = kid(x, y, num_subsets=10, subset_size=200, seed=seed)  # 10 x 200 <= 2000: near-disjoint subsets
    assert abs(same.mean) < 3 * same.stderr
    shifted = kid(x + 0.3, y, num_subsets=10, subset_size=200, seed=seed)
    assert shifted.mean > 5 * shifted.stderr > 0


def test_resampled_fd_matches_frechet_distance_of_the_repeated_rows():
    rng = np.random.default_rng(0)
    for n, d in ((300, 10), (40, 64)):  # N > D (D x D eigenproblem) and N < D (N x N Gram matrix)
        x = rng.standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 0.1
        a = rng.standard_normal((d, d))
        ref_mu, ref_sigma = rng.standard_normal(d), a @ a.T / d
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        s = feature_stats(np.repeat(x, counts, axis=0))
        expected = frechet_distance(s.mu, s.sigma, ref_mu, ref_sigma)
        assert _FixedReferenceFD(x, ref_mu, ref_sigma)(counts) == pytest.approx(expected, rel=1e-7)
        full = feature_stats(x)
        assert _FixedReferenceFD(x, ref_mu, ref_sigma)(np.ones(n, int)) == pytest.approx(
            frechet_distance(full.mu, full.sigma, ref_mu, ref_sigma), rel=1e-7)


def test_bootstrap_interval_contains_fd_and_shrinks_with_more_samples():
    d = 4  # low dimension, large shift: the sampling noise of the mean term dominates FD's bias
    widths = []
    for n in (500, 4000):
        r = bootstrap_fd(_gaussian(n, d, 2.0, 0), np.zeros(d), np.eye(d), num_resamples=200, seed=1)
        assert r.low < r.fd < r.high
        assert r.centered[0] < r.fd < r.centered[1]
        widths.append(r.high - r.low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(N): 2.8x narrower
    assert bootstrap_fd(_gaussian(500, d, 2.0, 0), np.zeros(d), np.eye(d), num_resamples=50, seed=1) == \
        bootstrap_fd(_gaussian(500, d, 2.0, 0), np.zeros(d), np.eye(d), num_resamples=50, seed=1)


def test_bootstrap_reports_the_small_n_bias():
    d = 64  # here FD's bias (~0.54) is ten times its noise: the percentile interval sits above fd
    r = bootstrap_fd(_gaussian(2000, d, 1.0, 0), np.zeros(d), np.eye(d), num_resamples=100, seed=0)
    assert 0.3 < r.bias < 0.8 and r.low > r.fd
    assert r.centered[0] < r.fd < r.centered[1]
    assert 0.03 < r.std < 0.1  # the mean term alone varies by 2 |delta| / sqrt(N) = 0.045


def test_fd_infinity_subset_fds_equal_frechet_distance_of_the_subsets():
    # the subsets go through _FixedReferenceFD (one square root of the reference covariance for all of
    # them, or none with N <= D); each point must still be the plain FD of that subset, for N > D and N < D
    from twostage.metrics.frechet import psd_sqrt

    rng = np.random.default_rng(5)
    for n, d in ((600, 16), (120, 200)):
        x = rng.standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 0.2
        a = rng.standard_normal((d, d))
        ref_mu, ref_sigma = rng.standard_normal(d), a @ a.T / d
        root = psd_sqrt(ref_sigma)
        assert np.allclose(root @ root, ref_sigma, atol=1e-10) and np.allclose(root, root.T)
        r = fd_infinity(x, ref_mu, ref_sigma, min_fraction=0.5, repeats=2, seed=3)
        again = fd_infinity(x, ref_mu, ref_sigma, min_fraction=0.5, repeats=2, seed=3, ref_sigma_sqrt=root)
        assert again.sizes == r.sizes and again.fds == pytest.approx(r.fds, rel=1e-9)  # given or computed root
        draws = np.random.default_rng(3)
        for size, fd in zip(r.sizes, r.fds):
            s = feature_stats(x[draws.choice(n, size, replace=False)])
            assert fd == pytest.approx(frechet_distance(s.mu, s.sigma, ref_mu, ref_sigma), rel=1e-7)


def test_torch_path_gives_the_numpy_values(monkeypatch):
    """On a CUDA device the estimators compute with torch tensors (the same code as for numpy arrays):
    forced onto torch on the CPU here, KID, FD_inf and the bootstrap give the numpy path's values."""
    import torch

    from twostage.metrics import unbiased

    rng = np.random.default_rng(0)
    x, ref = rng.normal(size=(300, 16)), rng.normal(0.2, 1.1, size=(400, 16))
    ref_mu, ref_sigma = ref.mean(0), np.cov(ref, rowvar=False)
    small = rng.normal(size=(12, 16))  # N <= D: the Gram-matrix branch of the resampled FD
    results = {}
    for path in ("numpy", "torch"):
        if path == "torch":
            monkeypatch.setattr(unbiased, "_f64", lambda a, device: torch.as_tensor(np.asarray(a, np.float64)))
        results[path] = (unbiased.kid(x, ref, num_subsets=5, subset_size=100, seed=1).mean,
                         unbiased.fd_infinity(x, ref_mu, ref_sigma, seed=2).fd_inf,
                         unbiased.bootstrap_fd(x, ref_mu, ref_sigma, num_resamples=5, seed=3).std,
                         unbiased.bootstrap_fd(small, ref_mu, ref_sigma, num_resamples=5, seed=3).std)
    np.testing.assert_allclose(results["torch"], results["numpy"], rtol=1e-7)  # eigensolver rounding
