"""The tokenizer command group dispatches on the config's kind (vq / kl) and probes VQ latents."""

import json

import numpy as np
import pytest
import yaml

from twostage import cli
from twostage.engine.run_files import RunLoadError
from twostage.registry import run_kind, source_kind
from twostage.data.token_cache import CacheDataset

TINY_DATA = ["data.name=npz", "data.image_size=16", "data.val_fraction=0.25"]
TINY_TRAIN = ["train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1",
              "train.num_workers=0", "train.device=cpu", "train.progress=false", "monitor.grid_images=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(0)
    np.savez(tmp / "data.npz", images=rng.integers(0, 256, size=(12, 16, 16), dtype=np.uint8),
             labels=np.arange(12) % 3)
    return tmp


def test_source_kind_reads_the_file_and_the_override_wins(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"kind": "kl", "model": {}}))
    assert source_kind("tokenizer", tmp_path / "c.yaml", []) == "kl"
    assert source_kind("tokenizer", tmp_path / "c.yaml", ["kind=vq"]) == "vq"
    assert source_kind("tokenizer", "vq_fmnist_f4", []) == "vq"
    with pytest.raises(RunLoadError, match="no config.yaml"):
        run_kind("tokenizer", tmp_path)


def test_kl_preset_trains_encodes_and_evaluates_through_the_cli(data, capsys):
    run, cache = data / "kl", data / "kl_cache"
    overrides = [*TINY_DATA, f"data.root={data / 'data.npz'}", "model.spec=f4d4", "model.base_channels=8",
                 "model.enc_res_blocks=1", "model.dec_res_blocks=1", "model.norm_groups=4", "loss.perceptual=none",
                 "loss.disc_channels=8", "loss.disc_layers=2", "vf.enabled=false", *TINY_TRAIN]
    assert cli.main(["tokenizer", "train", "kl_fmnist_f4d8", *overrides, "--out", str(run)]) == 0
    assert run_kind("tokenizer", run).name == "kl"
    assert cli.main(["tokenizer", "encode", str(run), "--split", "val", "--out", str(cache), "--num-workers", "0"]) == 0
    meta = CacheDataset(cache).meta
    assert meta.kind == "latents" and meta.channels == 4 and len(meta.latent_std) == 4
    out = data / "kl_recon.json"
    assert cli.main(["eval", "recon", str(run), "--no-perceptual", "--device", "cpu", "--batch-size", "3",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    flat = json.dumps(result)
    assert "psnr" in flat.lower() and "codebook_usage" not in flat  # a KL-VAE has no codebook
    # the VQ-only probe refuses a KL run with a message naming the reason
    assert cli.main(["tokenizer", "probe", str(run), "--steps", "1", "--device", "cpu"]) == 1
    assert "KL-VAE" in capsys.readouterr().err


def test_vq_probe_writes_both_views(data):
    run = data / "vq"
    overrides = [*TINY_DATA, f"data.root={data / 'data.npz'}", "model.base_channels=8", "model.channel_mult=[1,2,2]",
                 "model.enc_res_blocks=1", "model.dec_res_blocks=1", "model.z_channels=8", "model.norm_groups=4",
                 "model.codebook_size=32", "model.code_dim=4", "loss.perceptual=none", "loss.disc_channels=8",
                 "crt.enabled=true", "crt.width=32", "crt.heads=2", *TINY_TRAIN]
    assert cli.main(["tokenizer", "train", "vq_fmnist_f4", *overrides, "--out", str(run)]) == 0
    assert run_kind("tokenizer", run).name == "vq"
    out = data / "probe.json"
    assert cli.main(["tokenizer", "probe", str(run), "--steps", "3", "--train-images", "6", "--val-images", "3",
                     "--batch-size", "4", "--device", "cpu", "--num-workers", "0", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["crt_enabled"] is True and set(record["views"]) == {"pre_quant", "quantized"}
    for view in record["views"].values():
        assert view["val_images"] == 3 and len(view["val_error_per_position"]) == 16 and view["val_error"] > 0


def test_unknown_tokenizer_kind_is_named(capsys):
    assert cli.main(["tokenizer", "train", "vq_fmnist_f4", "kind=gan", "--out", "never_written"]) == 2
    assert "kind='gan' is not a tokenizer kind" in capsys.readouterr().err
