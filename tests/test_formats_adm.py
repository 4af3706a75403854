"""The field's file formats: samples in ADM's layout (`arr_0` uint8 NHWC, `arr_1` labels) as `generator sample`
writes them, older files (`images` / `labels`) still read; reference statistics under ADM's keys (`mu`, `sigma`,
`mu_s`, `sigma_s`), and ADM's published reference batches (`arr_0` + Inception `mu` / `sigma`) as `--ref`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_ar_task import stand_in_loader  # noqa: E402
from test_faults_support import AR_TRAIN, token_cache  # noqa: E402

from twostage import cli  # noqa: E402
from twostage.backbones import load_feature_network  # noqa: E402
from twostage.backbones.inception import InceptionFeatures  # noqa: E402
from twostage.data.datasets import ArrayDataset  # noqa: E402
from twostage.metrics.frechet import feature_stats  # noqa: E402
from twostage.metrics.generation import SamplesError, load_samples  # noqa: E402
from twostage.metrics.reference import ReferenceStats, ReferenceStatsError, reference_stats  # noqa: E402

N, SIZE = 6, 16


@pytest.fixture(scope="module")
def effnet():
    return load_feature_network("effnet-lite0")


def _images(seed: int = 0) -> np.ndarray:
    """N smooth colour patterns, uint8 (N, SIZE, SIZE, 3): something a feature network can tell apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    f, ph = rng.uniform(1, 4, (N, 1, 1, 3)), rng.uniform(0, 6, (N, 1, 1, 3))
    x = np.sin(f * 6 * xx[..., None] + ph) * np.cos(f * 4 * yy[..., None])
    return ((x + 1) * 127.5).astype(np.uint8)


def test_generator_sample_writes_the_adm_layout(tmp_path, monkeypatch):
    cache, run, out = token_cache(tmp_path / "cache"), tmp_path / "run", tmp_path / "s.npz"
    assert cli.main(["generator", "train", "ar_fmnist_tiny", *AR_TRAIN, "train.steps=2", "--tokens", str(cache),
                     "--out", str(run)]) == 0
    monkeypatch.setattr("twostage.tokenizers.base.load_tokenizer", stand_in_loader)  # 3x3 codes -> 12x12 gray
    assert cli.main(["generator", "sample", str(run), "--num", str(N), "--out", str(out), "--device", "cpu"]) == 0
    with open(out, "rb") as f:  # exactly how ADM's evaluator and most tools read a sample batch
        z = np.load(f)
        images, labels = z["arr_0"], z["arr_1"]
        assert "images" not in z.files and z["tokens"].shape == (N, 3, 3)
    assert images.dtype == np.uint8 and images.shape == (N, 12, 12, 3)  # NHWC, gray decoded to 3 channels
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    loaded = load_samples(out)
    assert np.array_equal(loaded.images, images) and np.array_equal(loaded.labels, labels)
    assert loaded.protocol["sampler"] == "ar-kv-cache"

    tokens_only = tmp_path / "t.npz"  # no images decoded: arr_0 is empty, still uint8 NHWC
    assert cli.main(["generator", "sample", str(run), "--num", str(N), "--out", str(tokens_only), "--tokens-only",
                     "--device", "cpu"]) == 0
    with np.load(tokens_only) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (0, 0, 0, 3)
        assert z["arr_1"].tolist() == labels.tolist() and z["tokens"].shape == (N, 3, 3)
    with pytest.raises(SamplesError, match="tokens only"):
        load_samples(tokens_only)


def test_samples_writer_refuses_images_off_the_layout(tmp_path):
    from twostage.generators.outputs import save_samples

    labels = np.zeros(N, np.int64)
    for bad in (_images().astype(np.float32) / 127.5 - 1, _images().transpose(0, 3, 1, 2), _images()[..., :1]):
        with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
            save_samples(tmp_path / "s.npz", bad, labels, {})
    assert not list(tmp_path.iterdir())


class TinyNetwork(torch.nn.Module):
    """12 pooled features and no spatial ones: `eval gen` end to end without EffNet's 1280-d covariances and
    their eigendecompositions (most of a minute on 2 shared cores)."""

    name, checksum = "Tiny", "0" * 64

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)}

    def protocol(self) -> dict:
        return {"feature_network": self.name, "feature_checksum": self.checksum}


def test_old_layout_still_loads_and_scores(tmp_path, monkeypatch):
    images, labels = _images(), np.arange(N) % 3
    proto = np.array(json.dumps({"sampler": "euler", "steps": 4}))
    np.savez(tmp_path / "old.npz", images=images, labels=labels, protocol=proto)  # written before the switch
    np.savez(tmp_path / "new.npz", arr_0=images, arr_1=labels, protocol=proto)
    old, new = load_samples(tmp_path / "old.npz"), load_samples(tmp_path / "new.npz")
    assert np.array_equal(old.images, new.images) and np.array_equal(old.labels, new.labels)
    assert old.protocol == new.protocol == {"sampler": "euler", "steps": 4}

    np.savez(tmp_path / "ref.npz", images=images, labels=labels)
    monkeypatch.setattr("twostage.backbones.load_feature_network", lambda name, weights=None: TinyNetwork())
    assert cli.main(["eval", "gen", str(tmp_path / "old.npz"), "--ref", f"npz:{tmp_path / 'ref.npz'}:train",
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-fdinf", "--kid-subsets", "0",
                     "--out", str(tmp_path / "old.json")]) == 0
    doc = json.loads((tmp_path / "old.json").read_text())
    assert doc["metrics"]["FD-Tiny"] == pytest.approx(0.0, abs=1e-6)
    assert doc["protocol"]["label_sampling"] == "balanced" and doc["protocol"]["sampler"] == "euler"


def test_reference_statistics_round_trip_under_adm_keys(tmp_path):
    rng = np.random.default_rng(0)
    pool, spatial = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    protocol = {"feature_network": "Tiny", "feature_checksum": "0" * 64, "image_size": SIZE, "num_images": 20}
    stats = ReferenceStats(feature_stats(pool), feature_stats(spatial), pool.astype(np.float32), protocol)
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path) as z:  # what ADM's evaluator reads (read_statistics): mu, sigma, mu_s, sigma_s
        assert {"mu", "sigma", "mu_s", "sigma_s", "n", "protocol", "pr_features"} == set(z.files)
        assert np.allclose(z["mu"], pool.mean(0)) and np.allclose(z["sigma_s"], np.cov(spatial, rowvar=False))
    back = ReferenceStats.load(path)
    assert np.array_equal(back.pool.sigma, stats.pool.sigma) and np.array_equal(back.spatial.mu, stats.spatial.mu)
    assert back.pool.n == 20 and back.protocol == protocol and back.pr_features.shape == (20, 4)

    np.savez(tmp_path / "old.npz", mu=stats.pool.mu, sigma=stats.pool.sigma, n=np.int64(20),  # written before
             mu_spatial=stats.spatial.mu, sigma_spatial=stats.spatial.sigma, protocol=np.array(json.dumps(protocol)))
    old = ReferenceStats.load(tmp_path / "old.npz")
    assert np.array_equal(old.spatial.sigma, stats.spatial.sigma) and old.protocol == protocol


def test_statistics_of_another_network_are_one_line(effnet, tmp_path, capsys):
    rng = np.random.default_rng(0)
    protocol = {"feature_network": "Tiny", "feature_checksum": "0" * 64, "image_size": SIZE}
    ReferenceStats(feature_stats(rng.normal(size=(20, 4))), None, None, protocol).save(tmp_path / "tiny.npz")
    with pytest.raises(ReferenceStatsError, match="holds statistics of Tiny.*asked for is EffNetLite0"):
        reference_stats(str(tmp_path / "tiny.npz"), effnet, SIZE)
    np.savez(tmp_path / "s.npz", arr_0=_images(), arr_1=np.arange(N) % 3)
    assert cli.main(["eval", "gen", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "tiny.npz"), "--device",
                     "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Tiny" in err and "EffNetLite0" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_adm_reference_batch_as_the_reference(effnet, tmp_path):
    rng = np.random.default_rng(1)
    images, labels = _images(seed=1), np.arange(N) % 3
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(20, 5)), rowvar=False)  # stand-ins for pool_3 stats
    mu_s, sigma_s = rng.normal(size=2), np.eye(2)
    batch = tmp_path / "VIRTUAL_tiny16_labeled.npz"  # the layout of ADM's published reference batches
    np.savez(batch, arr_0=images, arr_1=labels, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)

    # Inception-v3: the batch's own statistics (the network is not run, so a stand-in with its name will do)
    inception = SimpleNamespace(name=InceptionFeatures.name, checksum="f" * 64)
    stats, path = reference_stats(str(batch), inception, SIZE)
    assert path == batch and np.array_equal(stats.pool.mu, mu) and np.array_equal(stats.pool.sigma, sigma)
    assert np.array_equal(stats.spatial.mu, mu_s) and stats.pool.n == N and stats.pr_features is None
    with pytest.raises(ReferenceStatsError, match="16px images but the samples are 32px"):
        reference_stats(str(batch), inception, 32)

    # any other network: its features of the batch's arr_0 images, as of the same images given as a dataset
    adm, _ = reference_stats(str(batch), effnet, SIZE, cache_dir=tmp_path / "cache", progress=False)
    np.savez(tmp_path / "same.npz", images=images, labels=labels)
    plain, _ = reference_stats(f"npz:{tmp_path / 'same.npz'}:train", effnet, SIZE, cache_dir=tmp_path / "cache",
                               progress=False)
    assert adm.pool.mu.shape == (1280,) and adm.pool.n == N and adm.pr_features.shape == (N, 1280)
    assert np.allclose(adm.pool.mu, plain.pool.mu) and np.allclose(adm.pool.sigma, plain.pool.sigma)
    assert adm.protocol["feature_network"] == "EffNetLite0"

    unlabeled = tmp_path / "VIRTUAL_lsun16.npz"  # ADM's unconditional batches have no arr_1
    np.savez(unlabeled, arr_0=images, mu=mu, sigma=sigma)
    assert len(ArrayDataset.from_npz(unlabeled)) == N
    stats_only = tmp_path / "fid_stats.npz"  # mu / sigma alone (pytorch-fid): Inception-v3 only
    np.savez(stats_only, mu=mu, sigma=sigma)
    assert reference_stats(str(stats_only), inception, SIZE)[0].pool.n == -1
    with pytest.raises(ReferenceStatsError, match="serves --network inception-v3 only, not EffNetLite0"):
        reference_stats(str(stats_only), effnet, SIZE)
