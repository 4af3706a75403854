"""End to end: `eval gen` on a small npz reference (reference cache, JSON, protocol, naming)."""

import argparse
import json

import numpy as np
import pytest

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

    args = _parse(["eval", "gen", str(d / "noisy.npz"), "--ref", f"npz:{d / 'ref.npz'}:train",
                   "--cache-dir", str(d / "cache"), "--batch-size", "16", "--out", str(d / "noisy.json")])
    assert args.func(args) == 0
    noisy = json.loads((d / "noisy.json").read_text())
    assert noisy["metrics"]["FD-EffNetLite0"] > 1.0
    assert noisy["protocol"]["label_sampling"].startswith("unknown")
    assert len(list((d / "cache").glob("*.npz"))) == 1  # reused, not recomputed


def test_eval_gen_reports_missing_inception_weights(files, capsys):
    d = files
    argv = ["eval", "gen", str(d / "same.npz"), "--ref", "fashion-mnist:test", "--network", "inception-v3"]
    assert cli.main(argv) == 2  # a config error: nothing was evaluated
    assert "pt_inception-2015-12-05" in capsys.readouterr().err


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
