"""K seeds of one VQ tokenizer config trained as one joint run of stacked replicas
(twostage/tokenizers/run.py train_replicas, twostage/engine/replicas.py) against separate runs.

The VQ autoencoder step draws nothing at random, a replica's initialization is built as the separate
run's (seed_everything(its seed) first) and its batches are the separate run's (its own loader with its
seed; the flip is a function of data.seed, epoch and index): so a replica is its separate run up to float
rounding (vmap's batched convolutions), and the joint run resumes bit for bit. Tiny real runs on the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_faults_support import TINY_DATA, TINY_TRAIN, TINY_VQ, make_npz  # noqa: E402

from twostage import api, cli, registry  # noqa: E402
from twostage.config import ConfigError  # noqa: E402
from twostage.engine.run_files import load_run_weights  # noqa: E402
from twostage.tokenizers.run import train_replicas, train_run  # noqa: E402

# a CRT predictor small enough for the CPU, weighted from step 0 (no ramp) so that its gradient reaches both
TINY_CRT = ["crt.enabled=true", "crt.width=16", "crt.layers=1", "crt.heads=2", "crt.ramp_steps=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_npz(tmp_path_factory.mktemp("data"), n=16)


def _config(data: Path, steps: int, *extra: str):
    """The tiny VQ run (the preset's discriminator starts at step 10000: never, in these runs)."""
    overrides = [*TINY_DATA, f"data.root={data}", *TINY_VQ, *TINY_TRAIN, f"train.steps={steps}",
                 f"train.ckpt_every={min(steps, 2)}", *extra]
    return registry.load_config("tokenizer", "vq_fmnist_f4", overrides)[1]


def _assert_weights_close(a: Path, b: Path, module: str, weights: str, **tol) -> None:
    mine, theirs = load_run_weights(a, module, weights=weights), load_run_weights(b, module, weights=weights)
    assert mine.step == theirs.step and mine.state.keys() == theirs.state.keys()
    for key in mine.state:
        torch.testing.assert_close(mine.state[key], theirs.state[key], msg=key, **tol)


def test_replicas_equal_separate_runs_and_read_as_runs(tmp_path, data):
    seeds, outs = [3, 4], [tmp_path / "r0", tmp_path / "r1"]
    last = train_replicas(_config(data, 1, "train.ema_decay=0.9"), outs, seeds, tmp_path / "pack")
    for k, seed in enumerate(seeds):
        alone = tmp_path / f"alone{k}"
        logs = train_run(_config(data, 1, "train.ema_decay=0.9", f"train.seed={seed}"), alone)
        # the first step's loss, its own preview images (PSNR of their reconstruction) and the weights after it
        assert last[f"autoencoder/loss_r{k}"] == pytest.approx(logs["autoencoder/loss"], rel=1e-5)
        assert last[f"tokenizer/preview_psnr_r{k}"] == pytest.approx(logs["tokenizer/preview_psnr"], rel=1e-4)
        for module in ("tokenizer", "disc"):  # the idle discriminator too: its initialization is the run's
            _assert_weights_close(outs[k], alone, module, "raw", rtol=1e-4, atol=1e-5)
        _assert_weights_close(outs[k], alone, "tokenizer", "ema", rtol=1e-4, atol=1e-5)
        assert api.load_config(outs[k] / "config.yaml").train.seed == seed
        assert json.loads((outs[k] / "run.json").read_text())["replica_of"]["index"] == k
        assert (outs[k] / "samples" / "recon_0000001.png").is_file()
    # what reads a tokenizer run reads a replica folder: the loader and `twostage tokenizer encode`
    tok = api.load_tokenizer(outs[1], device="cpu")
    assert tok.step == 1 and tok.weights_path.parent.parent.parent == outs[1]
    cache = tmp_path / "cache"
    assert cli.main(["tokenizer", "encode", str(outs[1]), "--out", str(cache), "--device", "cpu",
                     "--num-workers", "0", "--batch-size", "8"]) == 0
    assert json.loads((cache / "meta.json").read_text())["tokenizer_run"] == str(outs[1].resolve())


def test_crt_predictor_trains_stacked(tmp_path, data):
    outs = [tmp_path / "c0", tmp_path / "c1"]
    last = train_replicas(_config(data, 2, *TINY_CRT), outs, [0, 1], tmp_path / "pack")
    assert {"autoencoder/crt", "autoencoder/loss_r0", "autoencoder/loss_r1"} <= set(last)
    alone = tmp_path / "alone"
    train_run(_config(data, 2, *TINY_CRT, "train.seed=1"), alone)
    for module in ("tokenizer", "crt"):  # the stacked predictor (math-backend attention under vmap) is the run's
        _assert_weights_close(outs[1], alone, module, "raw", rtol=1e-4, atol=1e-5)


def test_a_discriminator_that_would_start_is_refused_before_any_work(tmp_path, data):
    cfg = _config(data, 4, "loss.disc_start=3")
    outs = [tmp_path / "d0", tmp_path / "d1"]
    with pytest.raises(ConfigError, match=r"loss.disc_start=3 < train.steps=4: the discriminator phase cannot run "
                                          r"in stacked replicas; train the seeds separately or set loss.disc_start=4"):
        train_replicas(cfg, outs, [0, 1], tmp_path / "pack")
    assert not any(tmp_path.iterdir())
    # the engine's own guard, for any task whose later phase would run
    from twostage.engine.replicas import ReplicaTask
    from twostage.tokenizers.vq.task import VQTokenizerTask

    with pytest.raises(ConfigError, match="phase 'discriminator' of VQTokenizerTask starts at step 3 < train.steps=4"):
        ReplicaTask([VQTokenizerTask(cfg), VQTokenizerTask(cfg)], outs, [cfg, cfg])
    # kinds other than vq are refused up front
    kl = registry.load_config("tokenizer", "kl_fmnist_f4d8", [*TINY_DATA, f"data.root={data}"])[1]
    with pytest.raises(ConfigError, match="implemented for kind vq"):
        train_replicas(kl, outs, [0, 1], tmp_path / "pack")


def test_joint_run_resumes_exactly(tmp_path, data):
    whole = [tmp_path / "a0", tmp_path / "a1"]
    straight = train_replicas(_config(data, 4), whole, [0, 1], tmp_path / "pack_a")
    parts = [tmp_path / "b0", tmp_path / "b1"]
    train_replicas(_config(data, 2), parts, [0, 1], tmp_path / "pack_b")  # stopped after step 2 of 4
    resumed = train_replicas(_config(data, 4), parts, [0, 1], tmp_path / "pack_b")
    assert resumed["autoencoder/loss_r0"] == straight["autoencoder/loss_r0"]
    assert resumed["autoencoder/loss_r1"] == straight["autoencoder/loss_r1"]
    for a, b in zip(whole, parts):
        x, y = load_run_weights(a, "tokenizer", weights="raw"), load_run_weights(b, "tokenizer", weights="raw")
        assert x.step == y.step == 4
        assert all(torch.equal(x.state[key], y.state[key]) for key in x.state)


def test_cli(tmp_path, data, capsys):
    base = ["tokenizer", "train", "vq_fmnist_f4", *TINY_DATA, f"data.root={data}", *TINY_VQ, *TINY_TRAIN,
            "train.steps=1", "train.ckpt_every=1"]
    outs = ["--out", str(tmp_path / "s0"), str(tmp_path / "s1")]
    # an override after the --out folders is an override, not a third folder
    assert cli.main([*base[:-1], *outs, base[-1], "--seeds", "0", "1", "--pack", str(tmp_path / "pk")]) == 0
    assert f"trained {tmp_path / 'pk'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk", "s0", "s1"]
    assert (tmp_path / "s1" / "checkpoints" / "step_0000001").is_dir()
    # one --out is a single run, as before
    assert cli.main([*base, "--out", str(tmp_path / "one")]) == 0
    assert "replica_of" not in json.loads((tmp_path / "one" / "run.json").read_text())
    # wrong replica arguments: one line, exit 2, nothing written
    for argv, says in (([*outs, "--seeds", "0", "1"], "--pack"),
                       ([*outs, "--seeds", "0", "--pack", str(tmp_path / "p")], "2 --out, 1 --seeds"),
                       ([*outs, "--seeds", "0", "0", "--pack", str(tmp_path / "p")], "repeat a seed")):
        assert cli.main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "p").exists()
