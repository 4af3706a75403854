"""`generator branch`: a shorter budget cut from a longer run equals the shorter run trained alone.

With a schedule that does not depend on the run's length (warmup, then constant), the first N steps of a
longer run are the N-step run: same weights (raw and EMA), optimizer state and validation record, bit for
bit on the CPU. A cosine schedule is refused; the branched folder trains on like any run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_faults_support import token_cache  # noqa: E402

from twostage import api, cli  # noqa: E402
from twostage.common.errors import UserError  # noqa: E402
from twostage.engine import checkpoint as ckpt  # noqa: E402

TRAIN = ["train.batch_size=8", "train.ckpt_every=100", "train.log_every=1", "train.num_workers=0", "train.device=cpu",
         "train.progress=false", "train.ema_decay=0.9", "val.batch_size=4", "sample.grid_at_checkpoint=0",
         "optim.warmup_steps=2", "train.keep_checkpoints=1"]


def _files(run: Path, step: int) -> dict[str, bytes]:
    folder = run / "checkpoints" / f"step_{step:07d}"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.suffix == ".safetensors"}


def test_branch_equals_the_shorter_run(tmp_path):
    cache = token_cache(tmp_path / "cache")
    long = tmp_path / "long"
    api.train_generator(api.load_config("ar_fmnist_tiny", [*TRAIN, "train.steps=7", "train.ckpt_at=[3,5]"]), cache,
                        long, val_cache=cache)
    # keep_checkpoints=1, yet the ckpt_at steps stay
    assert [p.name for p in ckpt.list_checkpoints(long / "checkpoints")] == ["step_0000003", "step_0000005",
                                                                               "step_0000007"]
    alone = tmp_path / "alone5"
    api.train_generator(api.load_config("ar_fmnist_tiny", [*TRAIN, "train.steps=5", "train.ckpt_at=[3]"]), cache,
                        alone, val_cache=cache)
    assert cli.main(["generator", "branch", str(long), "--step", "5", "--out", str(tmp_path / "cut5")]) == 0
    cut = tmp_path / "cut5"
    assert _files(cut, 5) == _files(alone, 5)  # model, EMA and optimizer state, bit for bit
    assert (json.loads((cut / "val" / "step_0000005.json").read_text())["loss"]
            == json.loads((alone / "val" / "step_0000005.json").read_text())["loss"])
    assert api.load_config(cut / "config.yaml") == api.load_config(alone / "config.yaml")
    assert json.loads((cut / "run.json").read_text())["branched_from"]["step"] == 5
    assert max(json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()) == 5
    model, info = api.load_generator(cut)
    assert info["step"] == 5
    # the branched folder is a run: training it on to 7 steps gives the long run
    api.train_generator(api.load_config("ar_fmnist_tiny", [*TRAIN, "train.steps=7", "train.ckpt_at=[3,5]"]), cache,
                        cut, val_cache=cache)
    a, b = _files(cut, 7), _files(long, 7)
    assert a["model.safetensors"] == b["model.safetensors"] and a["ema.safetensors"] == b["ema.safetensors"]


def test_branch_refuses_what_is_not_a_prefix(tmp_path):
    cache = token_cache(tmp_path / "cache")
    run = tmp_path / "cosine"
    api.train_generator(api.load_config("ar_fmnist_tiny", [*TRAIN, "train.steps=4", "train.ckpt_at=[2]",
                                                           "optim.schedule=cosine", "optim.warmup_steps=0"]), cache, run)
    with pytest.raises(UserError, match="optim.schedule='cosine' depends on the run's length"):
        api.branch_generator(run, 2, tmp_path / "x")
    with pytest.raises(UserError, match="branch at a step in 1..4"):
        api.branch_generator(run, 9, tmp_path / "x")
    constant = tmp_path / "constant"
    api.train_generator(api.load_config("ar_fmnist_tiny", [*TRAIN, "train.steps=4"]), cache, constant)
    with pytest.raises(UserError, match="no checkpoint at step 3"):
        api.branch_generator(constant, 3, tmp_path / "x")
    assert not (tmp_path / "x").exists()
