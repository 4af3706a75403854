"""Distribution metrics: FD, IS-style score, precision/recall, naming, protocol."""

import json

import numpy as np
import pytest
import scipy.linalg

from twostage.metrics.frechet import FeatureStats, fd_from_features, feature_stats, frechet_distance
from twostage.metrics.inception_score import inception_score
from twostage.metrics.precision_recall import precision_recall
from twostage.metrics.protocol import Protocol, metric_name, write_result


def test_fd_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 64))
    assert fd_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fd_from_features(x, x, method="sqrtm") == pytest.approx(0.0, abs=1e-6)


def test_fd_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    # diagonal covariances: tr((S1 S2)^1/2) = sum sqrt(a b), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # rotated (non-diagonal) covariances: FD is invariant under a common rotation
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(q @ mu1, s1, q @ mu2, s2, method=method) == pytest.approx(closed, rel=1e-8)
    # and estimated from samples of the two Gaussians it converges to the closed form
    n = 200_000
    x = rng.normal(size=(n, d)) * np.sqrt(a) + mu1
    y = rng.normal(size=(n, d)) * np.sqrt(b) + mu2
    assert fd_from_features(x, y) == pytest.approx(closed, rel=0.02)


def test_fd_equals_direct_scipy_computation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 48)) @ rng.normal(size=(48, 48))
    y = rng.normal(size=(300, 48)) * 1.5 + 0.3
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fd_from_features(x, y) == pytest.approx(direct, rel=1e-8)
    assert fd_from_features(x, y, method="sqrtm") == pytest.approx(direct, rel=1e-10)


def test_fd_singular_covariances_and_errors():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 64))  # N < D: rank-deficient covariance
    y = rng.normal(size=(20, 64)) + 0.5
    assert np.isfinite(fd_from_features(x, y)) and fd_from_features(x, y) > 0
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.full((4, 2), np.nan))


def test_feature_stats_round_trip(tmp_path):
    s = feature_stats(np.random.default_rng(4).normal(size=(10, 3)), {"feature_network": "X"})
    t = FeatureStats.load(s.save(tmp_path / "s.npz"))
    assert np.allclose(s.mu, t.mu) and np.allclose(s.sigma, t.sigma) and t.n == 10
    assert t.protocol == {"feature_network": "X"}


def test_inception_score_bounds():
    k = 10
    same = np.tile(np.random.default_rng(5).normal(size=k), (200, 1))  # identical predictions
    assert inception_score(same)[0] == pytest.approx(1.0, abs=1e-12)
    onehot = np.eye(k)[np.arange(10 * k * 3) % k]  # uniform classes, confident: each split balanced
    mean, std = inception_score(probs=onehot, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        inception_score(same, probs=onehot)


def test_precision_recall_identical_and_far_sets():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # a generator covering only half the real data: high precision, recall about one half
    y = rng.normal(size=(1000, 2)).astype(np.float32)
    p, r = precision_recall(y, y[y[:, 0] > 0], k=3)
    assert p > 0.9 and 0.3 < r < 0.8


def test_metric_names_never_call_other_networks_fid():
    assert metric_name("fd", "InceptionV3") == "FID"
    assert metric_name("sfd", "InceptionV3") == "sFID"
    assert metric_name("fd", "EffNetLite0") == "FD-EffNetLite0"
    assert metric_name("rfd", "EffNetLite0") == "rFD-EffNetLite0"
    assert metric_name("is", "DINOv2-ViT-L14") == "IS-DINOv2-ViT-L14"
    for kind in ("fd", "sfd", "rfd", "is"):
        assert "FID" not in metric_name(kind, "EffNetLite0")


def test_protocol_record_written(tmp_path):
    p = Protocol(num_samples=10, sampler="euler", steps=250, cfg_scale=1.5, seed=0)
    path = write_result(tmp_path / "r.json", {"FD-EffNetLite0": 1.0}, p, command="twostage eval gen x")
    doc = json.loads(path.read_text())
    for key in ("num_samples", "label_sampling", "sampler", "steps", "cfg_scale", "precision",
                "feature_network", "feature_checksum", "reference", "seed", "package_version"):
        assert key in doc["protocol"]
    assert doc["protocol"]["label_sampling"] == "balanced" and doc["command"].startswith("twostage")
