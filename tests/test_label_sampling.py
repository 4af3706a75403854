"""Label sampling (`generator sample --labels balanced|train`, the study's sample.labels): the allocation in the
training proportions, the class counts a generator run records in model.json, sampling from them without the
cache, the one-line error for a run that lacks them (and its fix), the study spec and its sample argv."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_faults_support import AR_TRAIN  # noqa: E402

from twostage import api, cli  # noqa: E402
from twostage.common.errors import UserError  # noqa: E402
from twostage.config import ConfigError  # noqa: E402
from twostage.data.cache_writer import write_arrays  # noqa: E402
from twostage.data.token_cache import CacheMeta  # noqa: E402
from twostage.generators.outputs import balanced_labels, proportional_labels, sample_labels  # noqa: E402
from twostage.study.jobs import Job, Stage, generator_id, read_marker, write_marker  # noqa: E402
from twostage.study.plan import build_plan  # noqa: E402
from twostage.study.spec import load_spec, resolve_grid  # noqa: E402

COUNTS = [14, 7, 3]  # unequal classes, like emoji's groups
TRAIN = ["ar_fmnist_tiny", *AR_TRAIN, "train.steps=2", "train.ckpt_every=2"]


# -- the allocation ---------------------------------------------------------------------------------------


def test_proportional_labels_sum_to_n_within_one_of_the_exact_share_and_grouped():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 12))
        counts = rng.integers(0, 50, k)
        counts[rng.integers(0, k)] += 1  # not all zero
        n = int(rng.integers(0, 500))
        labels = proportional_labels(n, counts)
        alloc = np.bincount(labels, minlength=k)
        assert len(labels) == n and len(alloc) == k
        exact = n * counts / counts.sum()
        assert (np.abs(alloc - exact) < 1).all()
        assert (alloc[counts == 0] == 0).all()  # a class the cache lacks is never drawn
        assert (np.diff(labels) >= 0).all()  # grouped by class, like balanced labels (grids, files)
        np.testing.assert_array_equal(labels, proportional_labels(n, counts.tolist()))  # deterministic


def test_largest_remainder_by_hand_and_equal_counts_are_balanced_labels():
    # 10 * [14, 7, 3] / 24 = 5.83, 2.92, 1.25: floors 5, 2, 1; the 2 left go to the largest remainders (1, then 0)
    assert np.bincount(proportional_labels(10, COUNTS)).tolist() == [6, 3, 1]
    assert np.bincount(proportional_labels(48, COUNTS)).tolist() == [28, 14, 6]  # exact shares stay exact
    for n in range(0, 40):
        for k in range(1, 8):
            np.testing.assert_array_equal(proportional_labels(n, [5] * k), balanced_labels(n, k))
    with pytest.raises(ValueError):
        proportional_labels(5, [0, 0])


def test_sample_labels_choices_and_missing_counts():
    labels, proto = sample_labels(7, 3, "balanced", {}, "RUN")  # balanced needs nothing recorded
    np.testing.assert_array_equal(labels, balanced_labels(7, 3))
    assert proto == {"label_sampling": "balanced"}
    labels, proto = sample_labels(10, 3, "train", {"train_label_counts": COUNTS}, "RUN")
    assert np.bincount(labels).tolist() == [6, 3, 1] and proto == {"label_sampling": "train", "train_label_counts": COUNTS}
    with pytest.raises(ConfigError, match="labels='uniform'.*choose balanced .* or train"):
        sample_labels(10, 3, "uniform", {}, "RUN")
    with pytest.raises(UserError, match="RUN/model.json records no train_label_counts.*--labels balanced"):
        sample_labels(10, 3, "train", {}, "RUN")
    with pytest.raises(UserError, match="train_label_counts has 2 classes but the model has 3"):
        sample_labels(10, 3, "train", {"train_label_counts": [1, 2]}, "RUN")


# -- a tiny trained AR run --------------------------------------------------------------------------------


def unequal_cache(folder: Path) -> Path:
    """A token cache (3x3 tokens of 16 codes, 3 classes) whose classes hold COUNTS images, shuffled."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(3), COUNTS))
    plain = (labels[:, None] * 5 + np.arange(9)[None] + rng.integers(0, 2, (len(labels), 9))) % 16
    meta = CacheMeta(kind="tokens", grid=(3, 3), num_classes=3, tokenizer_run="", tokenizer_checksum="c" * 64,
                     split="train", codebook_size=16, image_size=12)
    return write_arrays(folder, meta, np.stack([plain, plain[:, ::-1]], axis=1), labels)


def train(cache: Path, out: Path) -> int:
    return cli.main(["generator", "train", *TRAIN, "--tokens", str(cache), "--out", str(out)])


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ar")
    cache = unequal_cache(tmp / "cache")
    assert train(cache, tmp / "run") == 0
    shutil.rmtree(cache)  # sampling must not need the training cache
    return tmp / "run"


def test_a_trained_run_records_its_training_class_counts(ar_run):
    info = json.loads((ar_run / "model.json").read_text())
    assert info["train_label_counts"] == COUNTS and info["train_samples"] == sum(COUNTS)


def _sample(run: Path, out: Path, *labels: str) -> int:
    return cli.main(["generator", "sample", str(run), "--num", "10", "--batch-size", "4", "--out", str(out),
                     "--device", "cpu", "--tokens-only", *labels])


def _protocol(path: Path) -> dict:
    with np.load(path) as z:
        inner = json.loads(str(z["protocol"]))
        assert inner == json.loads(path.with_suffix(".json").read_text())["protocol"]
        return {"labels": z["arr_1"], "count": len(z["tokens"] if "tokens" in z else z["arr_0"]), **inner}


def test_sampling_with_train_labels_follows_the_recorded_counts(ar_run, tmp_path):
    assert _sample(ar_run, tmp_path / "t.npz", "--labels", "train") == 0
    got = _protocol(tmp_path / "t.npz")
    assert got["labels"].tolist() == [0] * 6 + [1] * 3 + [2]  # largest remainder of 10 * [14, 7, 3] / 24, grouped
    assert got["count"] == 10
    assert got["label_sampling"] == "train" and got["train_label_counts"] == COUNTS
    # the default is unchanged: balanced labels, the same protocol keys as before
    assert _sample(ar_run, tmp_path / "b.npz") == 0
    got = _protocol(tmp_path / "b.npz")
    assert got["labels"].tolist() == balanced_labels(10, 3).tolist() and got["label_sampling"] == "balanced"
    assert "train_label_counts" not in got
    # the API takes the same choice
    api.sample(ar_run, 10, tmp_path / "a.npz", device="cpu", batch_size=4, tokens_only=True, labels="train")
    np.testing.assert_array_equal(_protocol(tmp_path / "a.npz")["labels"], [0] * 6 + [1] * 3 + [2])


def test_a_run_without_counts_is_one_line_naming_the_fix(ar_run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(ar_run, old)
    info = json.loads((old / "model.json").read_text())
    del info["train_label_counts"]  # as a run trained before they were recorded
    (old / "model.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert _sample(old, tmp_path / "s.npz", "--labels", "train") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "records no train_label_counts" in err and "--labels balanced" in err
    assert "re-run its `twostage generator train` command" in err
    assert not (tmp_path / "s.npz").exists()
    assert _sample(old, tmp_path / "s.npz") == 0  # balanced still works
    # the fix the message names: the same train command (same cache contents) resumes at its last step
    # and writes model.json again, now with the counts
    assert train(unequal_cache(tmp_path / "cache"), old) == 0
    assert json.loads((old / "model.json").read_text())["train_label_counts"] == COUNTS
    assert _sample(old, tmp_path / "s.npz", "--labels", "train") == 0


def test_a_bad_choice_is_refused_by_the_cli(ar_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _sample(ar_run, tmp_path / "s.npz", "--labels", "uniform")
    assert "invalid choice: 'uniform'" in capsys.readouterr().err


# -- the DiT kind: the same labels ------------------------------------------------------------------------


class FlatDecoder:
    """Stands in for the cache's tokenizer (the latent cache has none): gray 8x8 images."""

    checksum = ""

    def decode(self, z):
        return torch.zeros(z.shape[0], 3, 8, 8)


def test_dit_records_counts_and_samples_train_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(3), COUNTS))
    meta = CacheMeta(kind="latents", grid=(2, 2), num_classes=3, tokenizer_run="", tokenizer_checksum="d" * 64,
                     split="train", channels=4, image_size=8)
    cache = write_arrays(tmp_path / "cache", meta, rng.normal(size=(len(labels), 2, 4, 2, 2)).astype(np.float32),
                         labels)
    overrides = ["model.size=tiny", "train.steps=1", "train.batch_size=4", "train.ckpt_every=1", "train.num_workers=0",
                 "train.device=cpu", "train.progress=false", "sample.grid_at_checkpoint=0", "sample.steps=1"]
    assert cli.main(["generator", "train", "dit_fmnist", *overrides, "--tokens", str(cache),
                     "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "model.json").read_text())["train_label_counts"] == COUNTS
    monkeypatch.setattr("twostage.tokenizers.base.load_tokenizer", lambda *a, **k: FlatDecoder())
    out = api.sample(tmp_path / "run", 10, tmp_path / "s.npz", device="cpu", batch_size=4, grid=0, labels="train")
    got = _protocol(out)
    assert got["labels"].tolist() == [0] * 6 + [1] * 3 + [2] and got["count"] == 10
    assert got["label_sampling"] == "train" and got["train_label_counts"] == COUNTS


# -- the study spec ---------------------------------------------------------------------------------------


SPEC = {"name": "t", "tokenizers": [{"preset": "vq_fmnist_f4"}],
        "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"]}}, "budgets": [100],
        "tokenizer": {"steps": 50}, "seeds": {"eval": [0, 1]}}


def _sample_stages(job: Job) -> list[Stage]:
    return [s for s in job.stages if s.name.startswith("sample")]


def test_spec_labels_are_validated_and_reach_the_sample_argv_only_when_not_the_default(tmp_path):
    with pytest.raises(ConfigError, match="sample.labels='uniform' is not allowed; choose one of \\['balanced', 'train'\\]"):
        load_spec({**SPEC, "sample": {"labels": "uniform"}})
    default, trained = load_spec(SPEC), load_spec({**SPEC, "sample": {"labels": "train"}})
    assert default.sample.labels == "balanced"
    a, b = build_plan(default, tmp_path).generator_jobs[0], build_plan(trained, tmp_path).generator_jobs[0]
    # the same generator run (labels only change sampling): same id, same training command
    assert a.id == b.id and a.stages[0].argv == b.stages[0].argv
    assert generator_id(resolve_grid(default)[1][0], default) == generator_id(resolve_grid(trained)[1][0], trained)
    assert all("--labels" not in s.argv for s in _sample_stages(a))  # existing studies' markers stay valid
    for s in _sample_stages(b):  # every sampling seed
        assert s.argv[s.argv.index("--labels") + 1] == "train"
    # a study that sampled balanced labels samples (and so evaluates) again once it asks for train
    for stage in _sample_stages(a):
        write_marker(a, stage, tmp_path, 1.0)
    assert all(read_marker(a, s, tmp_path) is not None for s in _sample_stages(a))
    assert all(read_marker(b, s, tmp_path) is None for s in _sample_stages(b))
    assert load_spec("study_emoji_tokens").sample.labels == "train"
