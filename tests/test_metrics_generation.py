"""End to end: `eval gen` on a small npz reference (reference cache, JSON, protocol, naming)."""

import argparse
import json

import numpy as np
import pytest
import torch

from twostage import cli
from twostage.metrics import commands
from twostage.metrics.generation import label_sampling, load_samples, to_uint8_nhwc


def _parse(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] / 32.0
    imgs = []
    for i in range(30):  # smooth random colour patterns: something a feature network can describe
        f, ph = rng.uniform(1, 4, 3), rng.uniform(0, 6, 3)
        imgs.append(np.stack([np.sin(f[c] * 6 * xx + ph[c]) * np.cos(f[c] * 4 * yy) for c in range(3)], -1))
    imgs = ((np.stack(imgs) + 1) * 127.5).astype(np.uint8)
    labels = np.arange(30) % 10
    np.savez(d / "ref.npz", images=imgs, labels=labels)
    proto = json.dumps({"sampler": "euler", "steps": 50, "cfg_scale": 1.5, "seed": 7})
    np.savez(d / "same.npz", arr_0=imgs, arr_1=labels, protocol=np.array(proto))
    np.savez(d / "noisy.npz", arr_0=np.clip(imgs + rng.normal(0, 40, imgs.shape), 0, 255).astype(np.uint8))
    return d


def test_eval_gen_cli_writes_json_with_protocol(files, capsys):
    d = files
    args = _parse(["eval", "gen", str(d / "same.npz"), "--ref", f"npz:{d / 'ref.npz'}:train",
                   "--cache-dir", str(d / "cache"), "--batch-size", "16", "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "FD-EffNetLite0" in printed and "FID" not in printed
    doc = json.loads((d / "same.eval-EffNetLite0.json").read_text())
    m, p = doc["metrics"], doc["protocol"]
    assert m["FD-EffNetLite0"] == pytest.approx(0.0, abs=1e-3)
    assert m["sFD-EffNetLite0"] == pytest.approx(0.0, abs=1e-3)
    assert m["Precision-EffNetLite0"] == 1.0 and m["Recall-EffNetLite0"] == 1.0
    assert "IS-EffNetLite0" in m
    assert p["num_samples"] == 30 and p["label_sampling"] == "balanced"
    assert (p["sampler"], p["steps"], p["cfg_scale"], p["seed"]) == ("euler", 50, 1.5, 7)
    assert p["feature_network"] == "EffNetLite0" and len(p["feature_checksum"]) == 64
    assert p["reference"].startswith("npz:") and p["package_version"]
    assert doc["command"].startswith("twostage")
    assert len(list((d / "cache").glob("*.npz"))) == 1  # reference statistics cached
    # the estimators of unbiased.py: FD_inf and KID on by default, the bootstrap (costly) off
    assert {"FDinf-EffNetLite0", "FDinf-EffNetLite0_stderr", "KID-EffNetLite0", "KID-EffNetLite0_stderr"} <= set(m)
    assert "FD-EffNetLite0_low" not in m
    x = p["extra"]
    assert x["metric_seed"] == 0 and x["is_order"].startswith("shuffled with seed 0")
    assert x["kid"]["num_subsets"] == 100 and x["kid"]["subset_size"] == 30 and x["kid"]["reference_features"] == 30
    assert x["fd_infinity"]["sizes"][0] == 15 and x["fd_infinity"]["sizes"][-1] == 30 and "caveat" in x["fd_infinity"]
    assert x["fd_bootstrap"] == "off"

    args = _parse(["eval", "gen", str(d / "noisy.npz"), "--ref", f"npz:{d / 'ref.npz'}:train",
                   "--cache-dir", str(d / "cache"), "--batch-size", "16", "--out", str(d / "noisy.json")])
    assert args.func(args) == 0
    noisy = json.loads((d / "noisy.json").read_text())
    assert noisy["metrics"]["FD-EffNetLite0"] > 1.0
    # KID is unbiased, so the same images on both sides come out slightly negative; noise raises it
    assert noisy["metrics"]["KID-EffNetLite0"] > abs(m["KID-EffNetLite0"]) > 0
    assert noisy["protocol"]["label_sampling"].startswith("unknown")
    assert len(list((d / "cache").glob("*.npz"))) == 1  # reused, not recomputed


def test_eval_gen_reports_missing_inception_weights(files, capsys):
    d = files
    argv = ["eval", "gen", str(d / "same.npz"), "--ref", "fashion-mnist:test", "--network", "inception-v3"]
    assert cli.main(argv) == 2  # a config error: nothing was evaluated
    assert "pt_inception-2015-12-05" in capsys.readouterr().err


def _ref_stats(pool, with_features=True):
    from twostage.metrics.frechet import feature_stats
    from twostage.metrics.reference import ReferenceStats

    return ReferenceStats(feature_stats(pool), None, pool.astype(np.float32) if with_features else None)


def test_inception_score_does_not_depend_on_the_sample_order():
    # Sample files are grouped by class; IS cut such a file into consecutive chunks of about one class
    # each (p(y) of a chunk nearly one-hot), so the sorted file scored ~1 where the shuffled one scored ~10.
    from twostage.metrics.generation import generation_metrics

    rng = np.random.default_rng(0)
    labels = np.sort(np.arange(1000) % 10)  # balanced labels, sorted, as the samplers write them
    logits = 6.0 * np.eye(10)[labels] + rng.normal(0, 1, (1000, 10))
    pool = rng.normal(size=(1000, 4))
    ref = _ref_stats(rng.normal(size=(500, 4)))
    off = dict(fdinf=False, kid_subsets=0, bootstrap_resamples=0)
    record = {}
    grouped = generation_metrics({"pool": torch.from_numpy(pool), "logits": torch.from_numpy(logits)}, ref, "Net",
                                 record=record, **off)
    perm = rng.permutation(1000)
    mixed = generation_metrics({"pool": torch.from_numpy(pool[perm]), "logits": torch.from_numpy(logits[perm])},
                               ref, "Net", **off)
    assert grouped["IS-Net"] > 6 and mixed["IS-Net"] > 6  # ~1.1 for the grouped file before shuffling
    assert grouped["IS-Net"] == pytest.approx(mixed["IS-Net"], rel=0.02)
    assert record["is_order"] == "shuffled with seed 0, then 10 consecutive splits" and record["metric_seed"] == 0


def test_generation_metrics_add_fd_infinity_kid_and_the_bootstrap_interval():
    from twostage.metrics.generation import generation_metrics

    rng = np.random.default_rng(1)
    d = 8
    real = rng.normal(size=(4000, d))
    fake = rng.normal(size=(1000, d)) + np.r_[1.0, np.zeros(d - 1)]  # FD = 1 in law
    feats = {"pool": torch.from_numpy(fake)}
    record = {}
    m = generation_metrics(feats, _ref_stats(real), "InceptionV3", record=record, bootstrap_resamples=100,
                           kid_subsets=20, kid_subset_size=500)
    assert list(m)[:3] == ["FID", "FID_low", "FID_high"]  # the value first: tables pick the first "FID"
    assert {"FIDinf", "FIDinf_stderr", "KID", "KID_stderr"} <= set(m)  # Inception-v3: the usual names
    assert m["FID_low"] < m["FID"] < m["FID_high"] and m["FID_high"] - m["FID_low"] < 0.5
    assert abs(m["FIDinf"] - 1.0) < 0.15 and m["FIDinf_stderr"] > 0
    assert m["KID"] > 5 * m["KID_stderr"] > 0
    assert record["fd_infinity"]["sizes"] == [100, 325, 550, 775, 1000]  # min_fraction 0.1: N >= 25 D
    assert record["fd_infinity"]["min_fraction"] == 0.1 and "caveat" not in record["fd_infinity"]
    assert record["kid"]["num_subsets"] == 20 and record["kid"]["subset_size"] == 500
    assert record["kid"]["reference_features"] == 4000
    assert record["fd_bootstrap"]["num_resamples"] == 100 and record["fd_bootstrap"]["confidence"] == 0.95
    again = generation_metrics(feats, _ref_stats(real), "InceptionV3", bootstrap_resamples=100, kid_subsets=20,
                               kid_subset_size=500)
    assert again == m  # every estimator is seeded

    record = {}
    other = generation_metrics(feats, _ref_stats(real, with_features=False), "EffNetLite0", record=record,
                               fdinf=False, bootstrap_resamples=0)
    assert set(other) == {"FD-EffNetLite0"}  # no raw reference features: no KID (and no precision/recall)
    assert record["kid"].startswith("skipped: the reference statistics hold no raw features")
    assert record["fd_infinity"] == "off" and record["fd_bootstrap"] == "off"


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_eval_gen_refuses_samples_off_the_convention(tmp_path, capsys):
    from twostage.common.errors import UserError

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    unit = _write(tmp_path / "unit.npz", arr_0=u8.astype(np.float32) / 255.0)  # floats in [0, 1]
    with pytest.raises(UserError, match=r"\[0, 1\].*must be in \[-1, 1\]"):
        load_samples(unit)
    with pytest.raises(UserError, match=r"\[0, 255\]"):
        load_samples(_write(tmp_path / "u255.npz", arr_0=u8.astype(np.float32)))
    with pytest.raises(UserError, match="NaN"):
        load_samples(_write(tmp_path / "nan.npz", arr_0=np.full((2, 32, 32, 3), np.nan, np.float32)))
    with pytest.raises(UserError, match="empty"):
        load_samples(_write(tmp_path / "empty.npz", arr_0=np.zeros((0, 32, 32, 3), np.uint8)))
    with pytest.raises(UserError, match="labels"):
        load_samples(_write(tmp_path / "labels.npz", arr_0=u8, arr_1=np.arange(5)))
    text = tmp_path / "text.npz"
    text.write_text("this is not an archive\n")
    with pytest.raises(UserError, match="not an .npz file"):
        load_samples(text)
    np.save(tmp_path / "array.npy", u8)
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(UserError, match="single .npy array"):
        load_samples(tmp_path / "array.npz")
    assert load_samples(_write(tmp_path / "signed.npz", arr_0=u8.astype(np.float32) / 127.5 - 1)).images.shape == \
        (12, 32, 32, 3)  # the convention itself still loads
    # through the CLI: one line naming the problem, no traceback, nothing evaluated
    for bad, words in ((unit, "[-1, 1]"), (text, "not an .npz file"), (tmp_path / "empty.npz", "empty")):
        assert cli.main(["eval", "gen", str(bad), "--ref", "fashion-mnist:test"]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and "pickled" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_generation_refuses_in_memory_images_on_the_wrong_scale():
    from twostage.common.errors import UserError
    from twostage.metrics.generation import evaluate_generation

    with pytest.raises(UserError, match=r"\[-1, 1\]"):
        evaluate_generation(torch.rand(4, 3, 32, 32), "fashion-mnist:test", net=None)  # refused before any work
    with pytest.raises(UserError, match="at least 2"):
        evaluate_generation(torch.rand(1, 3, 32, 32) * 2 - 1, "fashion-mnist:test", net=None)


def test_reference_statistics_show_progress_and_a_cpu_time_estimate(files, tmp_path, caplog, capsys):
    import logging

    from twostage.metrics.reference import reference_stats

    class Tiny(torch.nn.Module):
        name, checksum = "Tiny", "0" * 64

        def forward(self, x):
            return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)}

        def protocol(self):
            return {"feature_network": self.name, "feature_checksum": self.checksum}

    caplog.set_level(logging.INFO, logger="twostage.metrics.reference")
    spec = f"npz:{files / 'ref.npz'}:train"
    stats, path = reference_stats(spec, Tiny(), 32, batch_size=7, cache_dir=tmp_path)
    log = caplog.text
    assert "the first 7 images took" in log and "will take about" in log and f"cached in {path}" in log
    err = capsys.readouterr().err
    assert "reference npz:" in err and "img/s" in err and f"{stats.pool.n}/{stats.pool.n}" in err  # tqdm bar
    caplog.clear()
    assert reference_stats(spec, Tiny(), 32, batch_size=7, cache_dir=tmp_path)[1] == path  # from the cache
    assert "will take" not in caplog.text and "from cache" in caplog.text


def test_samples_helpers():
    x = np.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4).astype(np.float32)
    u = to_uint8_nhwc(x)
    assert u.shape == (2, 4, 4, 3) and u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    assert label_sampling(np.array([0, 1, 2, 0, 1, 2])) == "balanced"
    assert label_sampling(np.array([0, 0, 1])).startswith("unbalanced")
    with pytest.raises(FileNotFoundError):
        load_samples("/nonexistent.npz")


def test_eval_recon_cli_with_a_tiny_tokenizer(files, monkeypatch, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from twostage.data.config import DataConfig
    from twostage.tokenizers.vq.config import VQRunConfig, VQConfig
    from twostage.tokenizers.vq.model import VQModel
    from twostage.tokenizers.vq.tokenizer import VQTokenizer

    torch.manual_seed(0)
    cfg = VQRunConfig()
    cfg.model = VQConfig(base_channels=8, channel_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1,
                         z_channels=8, norm_groups=4, mid_attn=False, codebook_size=32, code_dim=4)
    cfg.data = DataConfig(name="npz", root=str(files / "ref.npz"), image_size=32, val_fraction=0.4, flip=False)
    tok = VQTokenizer(VQModel(cfg.model), cfg, checksum="0" * 64, step=5)
    monkeypatch.setattr(VQTokenizer, "from_pretrained", classmethod(lambda cls, run, **kw: tok))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("kind: vq\n")  # the registry reads the run's kind
    args = _parse(["eval", "recon", str(tmp_path / "run"), "--batch-size", "6", "--device", "cpu"])
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "run" / "eval" / "recon-val-EffNetLite0-step5.json").read_text())
    m, p = doc["metrics"], doc["protocol"]
    assert {"rFD-EffNetLite0", "PSNR", "SSIM", "PD-EffNetLite0", "codebook_usage", "codebook_perplexity"} <= set(m)
    assert 0 < m["codebook_usage"] <= 1 and p["num_samples"] == 12
    assert p["extra"]["tokenizer_step"] == 5 and p["sampler"] == "reconstruction"
    assert "rFD-EffNetLite0" in capsys.readouterr().out
