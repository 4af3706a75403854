"""Tokenizer validation at checkpoints (monitor.val_images, twostage/tokenizers/autoencoder_task.py): PSNR,
rFD on EfficientNet-Lite0 (the packaged offline weights) and codebook usage logged and written to
RUN/val/step_XXXXXXX.json at every checkpoint, without shifting the training stream; skipped with one
warning when the data has no val split."""

from __future__ import annotations

import json
import logging

import pytest

from test_faults_support import make_npz, train_tokenizer

RFD = "rFD-EffNetLite0"


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("val_curve"), n=40)  # val_fraction 0.25: 10 val images


def test_vq_run_validates_at_every_checkpoint_without_shifting_training(data, tmp_path):
    run = train_tokenizer("vq", data, tmp_path / "vq", steps=4,
                          extra=["monitor.val_images=8", "train.ckpt_every=2", "loss.gan_weight=0"])
    logged = {r["step"]: r for r in _rows(run) if "val/psnr" in r}
    assert sorted(logged) == [2, 4]
    for step, row in logged.items():
        record = json.loads((run / "val" / f"step_{step:07d}.json").read_text())
        assert record["step"] == step and record["weights"] == "raw"
        for key in ("psnr", "ssim", RFD, "codebook_usage", "codebook_perplexity"):
            assert row[f"val/{key}"] == pytest.approx(record[key]), key
        assert record[RFD] >= 0 and 0 < record["codebook_usage"] <= 1 and record["psnr"] > 0
        proto = record["protocol"]
        assert proto["num_samples"] == 8 and proto["feature_network"] == "EffNetLite0"
        assert len(proto["feature_checksum"]) == 64 and proto["extra"]["tokenizer_step"] == step
        assert not any("FID" in k for k in row)  # the metric is named after its network
    # The same run without validation trains bit for bit alike (the engine forks the RNG around it).
    plain = train_tokenizer("vq", data, tmp_path / "plain", steps=4,
                            extra=["monitor.val_images=0", "train.ckpt_every=2", "loss.gan_weight=0"])
    assert not (plain / "val").exists()
    strip = lambda rows: [{k: v for k, v in r.items() if k.startswith("autoencoder/")} for r in rows]
    assert strip(_rows(plain)) == strip(_rows(run))


def test_kl_run_reports_no_codebook_statistics(data, tmp_path):
    run = train_tokenizer("kl", data, tmp_path / "kl", steps=1, extra=["monitor.val_images=4", "loss.gan_weight=0"])
    record = json.loads((run / "val" / "step_0000001.json").read_text())
    assert {"psnr", "ssim", RFD} <= set(record) and "codebook_usage" not in record
    assert record["protocol"]["num_samples"] == 4


def test_data_without_a_val_split_trains_and_warns_once(tmp_path, caplog):
    data = make_npz(tmp_path / "data", n=12)
    with caplog.at_level(logging.WARNING, logger="twostage.tokenizers.autoencoder_task"):
        run = train_tokenizer("vq", data, tmp_path / "vq", steps=2,
                              extra=["data.val_fraction=0", "monitor.val_images=8", "train.ckpt_every=1"])
    warnings = [r.getMessage() for r in caplog.records if "no validation at checkpoints" in r.getMessage()]
    assert len(warnings) == 1 and "val_fraction" in warnings[0]
    assert not (run / "val").exists() and not any("val/psnr" in r for r in _rows(run))


def test_checkpoint_side_work_runs_eagerly_and_leaves_the_compiled_training_graph_alone(data, tmp_path, monkeypatch):
    """train.compile compiles the modules in place; validation and previews at a checkpoint (eval mode,
    no grad, other batch sizes) must not recompile them: on an H200 that recompilation stalled each of
    the study's tokenizers for one to two minutes. Counted with a backend that records every graph."""
    import torch

    graphs: list[str] = []

    def counting(gm, example_inputs):  # what dynamo compiles, run as traced (no inductor: fast on a CPU)
        graphs.append(str(len(example_inputs)))
        return gm.forward

    plain_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: plain_compile(self, **{**kw, "backend": counting}))
    torch._dynamo.reset()
    run = train_tokenizer("vq", data, tmp_path / "compiled", steps=3,
                          extra=["train.compile=true", "monitor.val_images=6", "monitor.grid_images=4",
                                 "train.ckpt_every=1", "loss.gan_weight=0", "loss.perceptual=none"])
    assert sorted({r["step"] for r in _rows(run) if "val/psnr" in r}) == [1, 2, 3]
    assert graphs, "train.compile=true compiled nothing"
    # the training step's graphs are compiled at step 1, before the first checkpoint; later checkpoints
    # (validation of 6 images, a 4-image preview, eval mode) add none
    after_first = len(graphs)
    torch._dynamo.reset()
    graphs.clear()
    run = train_tokenizer("vq", data, tmp_path / "once", steps=1,
                          extra=["train.compile=true", "monitor.val_images=0", "monitor.grid_images=0",
                                 "train.ckpt_every=1", "loss.gan_weight=0", "loss.perceptual=none"])
    assert len(graphs) == after_first, f"checkpoint side work compiled {after_first - len(graphs)} more graph(s)"
    torch._dynamo.reset()


def test_checkpoint_side_work_does_not_autotune_convolutions(data, tmp_path, monkeypatch):
    """train.cudnn_benchmark autotunes the training loop's convolutions; a checkpoint's validation and
    preview meet their shapes once, so they run with cuDNN's heuristics (the setting is process-wide:
    training gets it back after)."""
    import torch

    from twostage.tokenizers.autoencoder_task import AutoencoderTask

    seen: dict[str, list[bool]] = {"side": [], "train": []}
    on_checkpoint, prepare = AutoencoderTask.on_checkpoint, AutoencoderTask.prepare

    def recording_checkpoint(self, *args, **kwargs):
        seen["side"].append(torch.backends.cudnn.benchmark)
        return on_checkpoint(self, *args, **kwargs)

    def recording_prepare(self, *args, **kwargs):
        seen["train"].append(torch.backends.cudnn.benchmark)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderTask, "on_checkpoint", recording_checkpoint)
    monkeypatch.setattr(AutoencoderTask, "prepare", recording_prepare)
    before = torch.backends.cudnn.benchmark
    train_tokenizer("vq", data, tmp_path / "run", steps=3,
                    extra=["train.cudnn_benchmark=true", "monitor.val_images=0", "train.ckpt_every=1",
                           "loss.gan_weight=0", "loss.perceptual=none"])
    assert seen["side"] == [False, False, False]
    assert seen["train"] and all(seen["train"][:1])  # the training step's batch is prepared with autotuning on
    assert torch.backends.cudnn.benchmark == before  # the process's own setting after training
