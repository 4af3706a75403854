"""K generator replicas trained as one (twostage/engine/replicas.py) against K separate runs.

Without randomness in the loss (dropouts 0) a replica is the separate run with its seed and cache,
up to float rounding (vmap's batched matmuls): same initialization, data order, per-replica clipping,
weight decay groups, Adam(W), EMA. The replicas' folders are normal run folders; the joint run resumes
exactly; a replica's checkpoint refuses to be resumed on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_faults_support import token_cache  # noqa: E402

from twostage import api, registry  # noqa: E402
from twostage.common.errors import UserError  # noqa: E402
from twostage.config import ConfigError  # noqa: E402
from twostage.engine import checkpoint as ckpt  # noqa: E402
from twostage.engine.optim import param_groups  # noqa: E402
from twostage.engine.replicas import StackedModule, clip_per_replica_  # noqa: E402
from twostage.engine.run_files import load_run_weights  # noqa: E402

DETERMINISTIC = ["model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0", "label_dropout=0"]
TRAIN = ["train.steps=6", "train.batch_size=8", "train.ckpt_every=3", "train.log_every=1", "train.num_workers=0",
         "train.device=cpu", "train.progress=false", "train.ema_decay=0.9", "val.batch_size=4",
         "sample.grid_at_checkpoint=0", "optim.grad_clip=0.05", "optim.weight_decay=0.1"]


def _config(*extra: str):
    return api.load_config("ar_fmnist_tiny", [*TRAIN, *DETERMINISTIC, *extra])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    # two "tokenizers" with the same code shape (3x3 tokens, 16 codes) but different data
    return [token_cache(root / "a", seed=1, checksum="a"), token_cache(root / "b", seed=2, checksum="b")]


def test_replicas_equal_separate_runs(tmp_path, caches):
    seeds = [3, 4]
    outs = [tmp_path / "r0", tmp_path / "r1"]
    last = api.train_generator_replicas(_config(), caches, outs, seeds, tmp_path / "pack", val_caches=caches)
    assert {"ar/loss_r0", "ar/loss_r1", "ar/loss"} <= set(last)
    for k, (cache, seed) in enumerate(zip(caches, seeds)):
        alone = tmp_path / f"alone{k}"
        logs = api.train_generator(_config(f"train.seed={seed}"), cache, alone, val_cache=cache)
        assert logs["ar/loss"] == pytest.approx(last[f"ar/loss_r{k}"], rel=1e-4, abs=1e-5)
        for weights in ("raw", "ema"):
            mine, theirs = (load_run_weights(d, "gpt", weights=weights) for d in (outs[k], alone))
            assert mine.step == theirs.step == 6
            assert mine.state.keys() == theirs.state.keys()
            for key in mine.state:
                torch.testing.assert_close(mine.state[key], theirs.state[key], rtol=1e-4, atol=1e-5, msg=key)
        # the replica's folder reads like a single run's: config (its own seed), model.json, val records
        assert api.load_config(outs[k] / "config.yaml").train.seed == seed
        info = json.loads((outs[k] / "model.json").read_text())
        assert info == json.loads((alone / "model.json").read_text()) | {"train_cache": info["train_cache"]}
        mine_val = json.loads((outs[k] / "val" / "step_0000006.json").read_text())
        theirs_val = json.loads((alone / "val" / "step_0000006.json").read_text())
        assert mine_val["loss"] == pytest.approx(theirs_val["loss"], rel=1e-4)
        assert json.loads((outs[k] / "run.json").read_text())["replica_of"]["index"] == k
    model, info = api.load_generator(outs[1])  # the usual loader
    assert info["step"] == 6


def test_joint_run_resumes_exactly(tmp_path, caches):
    outs = [tmp_path / "a0", tmp_path / "a1"]
    whole = api.train_generator_replicas(_config("model.resid_dropout=0.2"), caches, outs, [0, 1], tmp_path / "pack")
    outs2 = [tmp_path / "b0", tmp_path / "b1"]
    api.train_generator_replicas(_config("model.resid_dropout=0.2", "train.steps=3"), caches, outs2, [0, 1],
                                 tmp_path / "pack2")
    resumed = api.train_generator_replicas(_config("model.resid_dropout=0.2"), caches, outs2, [0, 1],
                                           tmp_path / "pack2")
    assert resumed["ar/loss_r0"] == whole["ar/loss_r0"] and resumed["ar/loss_r1"] == whole["ar/loss_r1"]
    for a, b in zip(outs, outs2):
        x, y = load_run_weights(a, "gpt"), load_run_weights(b, "gpt")
        assert all(torch.equal(x.state[k], y.state[k]) for k in x.state)
    # a replica folder is not a run that can continue alone
    with pytest.raises(ckpt.CheckpointError, match="replica 0 of the joint run"):
        api.train_generator(_config("model.resid_dropout=0.2", "train.steps=9"), caches[0], outs[0])


def test_replica_checks_before_any_write(tmp_path, caches):
    cfg = _config()
    with pytest.raises(ConfigError, match="one of each per replica"):
        api.train_generator_replicas(cfg, caches, [tmp_path / "x"], [0, 1], tmp_path / "p")
    with pytest.raises(ConfigError, match="same cache and seed"):
        api.train_generator_replicas(cfg, [caches[0], caches[0]], [tmp_path / "x", tmp_path / "y"], [0, 0],
                                     tmp_path / "p")
    other = token_cache(tmp_path / "wide", seed=3, checksum="c")
    meta = json.loads((other / "meta.json").read_text())
    assert meta["codebook_size"] == 16
    assert not (tmp_path / "p").exists() and not (tmp_path / "x").exists()


def test_cli_trains_replicas(tmp_path, caches, capsys):
    from twostage import cli

    argv = ["generator", "train", "ar_fmnist_tiny", *TRAIN, "--tokens", *map(str, caches),
            "--out", str(tmp_path / "c0"), str(tmp_path / "c1"), "--seeds", "0", "0", "--pack", str(tmp_path / "pk")]
    assert cli.main(argv) == 0
    assert "trained" in capsys.readouterr().out
    assert (tmp_path / "c1" / "checkpoints").is_dir()
    # several --out without --pack: a one-line error, exit 2
    assert cli.main(argv[:-2]) == 2
    assert "--pack" in capsys.readouterr().err


def test_stacked_module_pieces():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)) for _ in range(3)]
    stacked = StackedModule(models)
    assert stacked.replicas == 3 and stacked.weights[0].shape == (3, 4, 3)
    for k, m in enumerate(models):
        plain = stacked.replica(k)
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), m.state_dict().values()))
    # weight decay goes to what a single run decays: the Linear weight only, not biases or norm gains
    decay, no_decay = param_groups([stacked], 0.1)
    assert [p.shape for p in decay["params"]] == [(3, 4, 3)]
    assert len(no_decay["params"]) == 3
    # per-replica clipping: each replica's gradient is clipped on its own norm
    for w in stacked.weights:
        w.grad = torch.ones_like(w)
        w.grad[0] *= 0.001  # replica 0's gradient is tiny: left alone
    norms = clip_per_replica_(list(stacked.weights), 1.0, 3)
    assert norms[0] < 1.0 < norms[1]
    after = torch.stack([sum(w.grad[k].square().sum() for w in stacked.weights).sqrt() for k in range(3)])
    assert after[0] == pytest.approx(norms[0].item(), rel=1e-6)
    assert after[1:].tolist() == pytest.approx([1.0, 1.0], rel=1e-4)
    with pytest.raises(ValueError, match="another architecture"):
        StackedModule([torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)])


def test_every_generator_kind_builds_a_task():
    for kind in registry.GENERATORS.values():
        assert callable(kind.task_fn())
    assert issubclass(ConfigError, UserError)


def _latent_cache(folder: Path, codes, scale: float = 1.0, shift: float = 0.0) -> Path:
    """A float32 latent cache of `codes` * scale + shift with its per-channel statistics (the DiT's
    normalization reads them), 4 classes, 3 channels on a 2x2 grid."""
    import numpy as np

    from twostage.data.cache_writer import write_arrays
    from twostage.data.token_cache import CacheMeta

    codes = codes * scale + shift
    mean, std = codes.mean(axis=(0, 1, 3, 4)), codes.std(axis=(0, 1, 3, 4))
    meta = CacheMeta(kind="latents", grid=(2, 2), num_classes=4, tokenizer_run="/nonexistent", tokenizer_checksum="x",
                     split="train", channels=3, image_size=8, latent_mean=mean.tolist(), latent_std=std.tolist())
    return write_arrays(folder, meta, codes, np.arange(len(codes)) % 4, dtype=np.float32)


def _dit_config(*extra: str):
    return api.load_config("dit_fmnist", ["model.size=mini", "train.steps=4", "train.batch_size=8", "train.ckpt_every=2",
                                          "train.log_every=1", "train.num_workers=0", "train.device=cpu",
                                          "train.progress=false", "val.batch_size=8", "val.max_samples=8",
                                          "sample.grid_at_checkpoint=0", "optim.warmup_steps=0", *extra])


def test_flow_generator_trains_as_replicas_on_the_caches_of_two_tokenizers(tmp_path):
    """The DiT's loss draws noise and timesteps (per replica under vmap): no bit-equality with separate
    runs to check, but the joint run trains on two caches, each replica's folder loads like a single run's."""
    import numpy as np

    rng = np.random.default_rng(0)
    caches = [_latent_cache(tmp_path / f"lat{k}", rng.standard_normal((24, 2, 3, 2, 2)).astype(np.float32))
              for k in range(2)]
    outs = [tmp_path / "d0", tmp_path / "d1"]
    last = api.train_generator_replicas(_dit_config(), caches, outs, [0, 1], tmp_path / "pack", val_caches=caches)
    assert all(torch.isfinite(torch.tensor(last[f"flow/loss_r{k}"])) for k in range(2))
    for k, out in enumerate(outs):
        model, info = api.load_generator(out)
        assert info["step"] == 4 and json.loads((out / "run.json").read_text())["replica_of"]["index"] == k
        assert (out / "val" / "step_0000004.json").is_file()
    a, b = (load_run_weights(o, "dit") for o in outs)
    assert any(not torch.equal(a.state[k], b.state[k]) for k in a.state)  # two seeds, two models


def test_each_flow_replica_normalizes_with_its_own_cache(tmp_path, monkeypatch):
    """Cache B is cache A scaled by 4 and shifted by 3, with its own statistics: normalized, the two are the
    same data. With the loss's random draws made deterministic (the same for every replica) and one seed,
    the replica on B must train exactly like the one on A; with replica 0's statistics for both (the code
    before Task.replica_tensors) B's inputs would be 4x off and the two would differ."""
    import numpy as np

    from twostage.generators.dit import task as dit_task

    monkeypatch.setattr(dit_task, "sample_time", lambda n, **kw: torch.full((n,), 0.3, device=kw.get("device")))
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.sin(3.0 * x + 1.0))
    codes = np.random.default_rng(0).standard_normal((24, 2, 3, 2, 2)).astype(np.float32)
    caches = [_latent_cache(tmp_path / "a", codes), _latent_cache(tmp_path / "b", codes, scale=4.0, shift=3.0)]
    outs = [tmp_path / "ra", tmp_path / "rb"]
    last = api.train_generator_replicas(_dit_config("label_dropout=0"), caches, outs, [5, 5], tmp_path / "pack")
    assert last["flow/loss_r0"] == pytest.approx(last["flow/loss_r1"], rel=1e-4)
    a, b = (load_run_weights(o, "dit", weights="raw").state for o in outs)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_repa_replicas_must_share_a_cache(tmp_path):
    """With REPA the loss decodes latents with its cache's tokenizer, which one stacked loss cannot do per
    replica: replicas on two caches are refused before anything is written."""
    import numpy as np

    rng = np.random.default_rng(1)
    caches = [_latent_cache(tmp_path / f"lat{k}", rng.standard_normal((24, 2, 3, 2, 2)).astype(np.float32))
              for k in range(2)]
    outs = [tmp_path / "d0", tmp_path / "d1"]
    with pytest.raises(ConfigError, match="must read one cache"):
        api.train_generator_replicas(_dit_config("repa.enabled=true", "repa.layer=2"), caches, outs, [0, 1], tmp_path / "pack")
    assert not any(o.exists() for o in outs) and not (tmp_path / "pack").exists()
    assert registry.generator_kind("dit").replicas_share_cache(_dit_config("repa.enabled=true", "repa.layer=2"))
    assert not registry.generator_kind("dit").replicas_share_cache(_dit_config())
    assert not registry.generator_kind("ar").replicas_share_cache(_config())


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on the CPU needs a C++ compiler (Debian: apt-get install g++)")
def test_compiled_replicas_train_like_eager_ones(tmp_path, caches, monkeypatch):
    """train.compile compiles the vmapped loss (the code that runs); without randomness it trains the same
    weights as the eager path, up to float rounding."""
    # Inductor's CPU build imports setuptools; when another test has already imported the standard library's
    # distutils, setuptools' distutils shim then fails an assertion. Keeping the standard one avoids that.
    monkeypatch.setenv("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    seeds, states = [3, 4], {}
    for mode in ("false", "true"):
        outs = [tmp_path / f"{mode}{k}" for k in range(2)]
        api.train_generator_replicas(_config(f"train.compile={mode}", "train.steps=3", "train.ckpt_every=3"),
                                     caches, outs, seeds, tmp_path / f"pack_{mode}")
        states[mode] = [load_run_weights(o, "gpt", weights="raw").state for o in outs]
    for eager, compiled in zip(states["false"], states["true"]):
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
