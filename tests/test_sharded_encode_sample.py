"""`tokenizer encode` and `generator sample` under torchrun: two gloo processes on the CPU share the
batches, and rank 0 writes one cache / samples file equal, byte for byte, to a one-process run with
the same batch size and seed (twostage/engine/distributed.py: deal_batches)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

from test_faults_support import AR_TRAIN, make_npz, train_tokenizer  # noqa: E402

from twostage import config as configlib  # noqa: E402

ENCODE = {"batch_size": 4, "device": "cpu"}  # 27 training images: 7 batches, the last one short, 4 vs 3 per rank
AR_SAMPLE = {"num": 7, "seed": 3, "batch_size": 2, "device": "cpu", "precision": "fp32", "grid": 4}
DIT_SAMPLE = {"num": 5, "seed": 3, "batch_size": 2, "device": "cpu", "precision": "fp32", "grid": 4, "steps": 2,
              "sampler": "euler", "cfg_scale": 1.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(root: Path, tag: str) -> dict[str, Path]:
    return {name: root / f"{name}_{tag}" for name in ("vq_cache", "kl_cache", "ar", "dit")}


def _encode_and_sample(root: Path, tag: str) -> None:
    """Everything the test compares, written under names ending in `tag` (by one process or by all)."""
    from twostage.generators.ar.run import sample_run as ar_sample
    from twostage.generators.dit.run import sample_run as dit_sample
    from twostage.tokenizers.run import encode_run

    out = _outputs(root, tag)
    encode_run(root / "vq", "train", out["vq_cache"], **ENCODE)
    encode_run(root / "kl", "train", out["kl_cache"], **ENCODE)  # a sampled posterior: noise per global batch
    ar_sample(root / "ar", out=out["ar"].with_suffix(".npz"), **AR_SAMPLE)
    dit_sample(root / "dit", out=out["dit"].with_suffix(".npz"), **DIT_SAMPLE)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from twostage.tokenizers.vq.tokenizer import VQTokenizer

    encoded = []  # the images this rank pushed through the VQ encoder: proof the work was split
    plain_encode = VQTokenizer.encode
    VQTokenizer.encode = lambda self, x, *a, **k: encoded.append(len(x)) or plain_encode(self, x, *a, **k)
    _encode_and_sample(Path(root), "ddp")
    (Path(root) / f"encoded_rank{rank}.json").write_text(json.dumps(encoded))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from twostage.generators.ar.config import ARRunConfig
    from twostage.generators.dit.config import DiTRunConfig
    from twostage.generators.training import train_run
    from twostage.tokenizers.run import encode_run

    root = tmp_path_factory.mktemp("sharded")
    data = make_npz(root / "data", n=36)
    train_tokenizer("vq", data, root / "vq", steps=1)
    train_tokenizer("kl", data, root / "kl", steps=1, extra=["model.encode_posterior=sample"])
    vq_cache = encode_run(root / "vq", "train", root / "vq_train", **ENCODE)
    kl_cache = encode_run(root / "kl", "train", root / "kl_train", **ENCODE)
    ar = configlib.load(ARRunConfig, "ar_fmnist_tiny", [*AR_TRAIN, "train.steps=2", "train.ckpt_every=2"])
    train_run(ar, vq_cache, root / "ar")
    dit = configlib.load(DiTRunConfig, "dit_fmnist", [
        "model.size=tiny", "train.steps=2", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1",
        "train.num_workers=0", "train.device=cpu", "train.progress=false", "sample.grid_at_checkpoint=0"])
    train_run(dit, kl_cache, root / "dit")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a CPU convolution's float sums depend on the thread count
    try:
        _encode_and_sample(root, "single")
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_worker, args=(2, _free_port(), str(root)), nprocs=2, start_method="spawn")
    return root


def _same_cache(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f"{f.name} differs"


def test_encode_on_two_ranks_writes_the_one_process_cache(outputs):
    single, ddp = _outputs(outputs, "single"), _outputs(outputs, "ddp")
    for name in ("vq_cache", "kl_cache"):
        _same_cache(single[name], ddp[name])  # codes, labels and meta.json (checksums, channel statistics)
    meta = json.loads((ddp["kl_cache"] / "meta.json").read_text())
    assert meta["latent_mean"] is not None and len(meta["latent_mean"]) == 4
    # each rank encoded its own batches only (plain + flipped): 4 of the 7 batches on rank 0, 3 on rank 1
    counts = [json.loads((outputs / f"encoded_rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(counts[0]) == 2 * (4 + 4 + 4 + 3) and sum(counts[1]) == 2 * (4 + 4 + 4)
    assert not list(outputs.glob(".*tmp*"))  # no scratch folder or part file left behind


def test_the_kl_cache_holds_sampled_posteriors(outputs):
    # the sampled posterior really is sampled (not the mean), so the noise seeding above was exercised
    from twostage.tokenizers.base import load_tokenizer

    tok = load_tokenizer(outputs / "kl")
    x = torch.zeros(2, 1, 16, 16)
    assert not torch.equal(tok.encode(x), tok.encode(x))


@pytest.mark.parametrize("kind", ["ar", "dit"])
def test_sample_on_two_ranks_writes_the_one_process_file(outputs, kind):
    single, ddp = _outputs(outputs, "single")[kind], _outputs(outputs, "ddp")[kind]
    with np.load(single.with_suffix(".npz")) as a, np.load(ddp.with_suffix(".npz")) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
        n = (AR_SAMPLE if kind == "ar" else DIT_SAMPLE)["num"]
        assert b["arr_0"].shape == (n, 16, 16, 3) and len(b["arr_1"]) == n
        assert json.loads(str(b["protocol"]))["seed"] == 3
    assert single.with_suffix(".png").read_bytes() == ddp.with_suffix(".png").read_bytes()
    record = json.loads(ddp.with_suffix(".json").read_text())
    assert record["processes"] == 2
