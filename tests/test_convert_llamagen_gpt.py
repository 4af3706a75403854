"""`twostage convert llamagen-gpt` (twostage/convert/llamagen_gpt.py) against LlamaGen's own code.

The golden file tests/golden/llamagen_gpt.safetensors was made by scripts/golden/llamagen_gpt.py with
FoundationVision/LlamaGen at commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec (autoregressive/models/gpt.py):
a small c2i GPT (2 layers, width 64, 4 heads, vocabulary 64, 10 classes + null row, 4x4 grid, one class
token) on 4 sequences, with LlamaGen's teacher-forced logits (its training path) and its KV-cache
logits (prefill, then one token a step), with float64 weights. Its weights are not stored:
`golden_state` rebuilds them with the VQ test's platform-independent fill, checked by the recorded
sha256. The test converts them (API and CLI) with a VQ run of a 64-code codebook as --tokenizer, loads
the run with twostage's loader and requires the same logits within 1e-5 in float32, teacher-forced and
with twostage's own KV-cache prefill / decode. Both implementations compute RMSNorm statistics and RoPE
in float32 whatever the weights' dtype, so float64 runs are not compared at 1e-10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twostage import api, cli
from twostage.common.hashing import file_sha256
from twostage.config import ConfigError
from twostage.convert import ConversionError, convert
from twostage.engine.checkpoint import load_checkpoint
from twostage.engine.run_files import read_model_json
from test_convert_llamagen_vq import golden as vq_golden, golden_state as vq_golden_state, golden_tensor, \
    weights_sha256

GOLDEN = Path(__file__).parent / "golden" / "llamagen_gpt.safetensors"
# float32 against LlamaGen's float64-weight logits (|logits| ~ 1-5): measured gaps ~1e-6.
TOL = {"atol": 1e-5, "rtol": 1e-5}


def golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    return load_file(str(GOLDEN)), meta


def golden_state(meta: dict[str, str]) -> dict[str, torch.Tensor]:
    seed = int(meta["seed"])
    state = {key: golden_tensor(key, tuple(shape), seed) for key, shape in json.loads(meta["state_keys"])}
    assert weights_sha256(state) == meta["weights_sha256"], "the fill no longer gives the golden weights"
    return state


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    """A converted LlamaGen VQ-16 run (codebook 64) at 64 pixels: a 4x4 grid, the GPT's block size 16."""
    tmp = tmp_path_factory.mktemp("vq")
    _, meta = vq_golden("vq16")
    save_file(vq_golden_state(meta), str(tmp / "vq.safetensors"))
    return convert("llamagen-vq", tmp / "vq.safetensors", tmp / "run", ["data.image_size=64"])


def check_run(run: Path, out: dict[str, torch.Tensor], vq: Path) -> None:
    """The run's model computes LlamaGen's logits, teacher-forced and one cached step at a time."""
    model, info = api.load_generator(run)
    cfg = info["config"].model
    assert cfg.shape == (2, 64, 4) and cfg.prefix_rope == "zero" and cfg.ffn_hidden == 256
    assert (info["vocab_size"], info["num_classes"], list(info["grid"])) == (64, 10, [4, 4])
    assert info["tokenizer_run"] == str(vq.resolve())
    assert info["tokenizer_checksum"] == file_sha256(vq / "checkpoints/step_0000000/model.safetensors")
    tokens, labels = out["tokens"], out["labels"]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, labels), out["logits"], **TOL)
        model.setup_caches(len(labels))
        steps = [model.prefill(labels)]
        kv_positions = torch.arange(model.seq_len)
        for pos in range(1, model.seq_len):
            steps.append(model.decode(tokens[:, pos - 1], torch.tensor(pos), kv_positions))
        model.clear_caches()
        torch.testing.assert_close(torch.stack(steps, 1), out["logits_cached"], **TOL)


def test_converted_run_computes_what_llamagen_computes(vq_run, tmp_path):
    out, meta = golden()
    assert out["logits"].abs().max() > 1 and out["logits"][:, 0].std() > 0.1  # a non-trivial head
    state = golden_state(meta)
    src = tmp_path / "gpt.pt"
    # a training checkpoint of torch.compile'd weights, as LlamaGen's train_c2i.py saves it
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "steps": 0}, src)
    run = convert("llamagen-gpt", src, tmp_path / "run", ["model.heads=4", "sample.cfg_scale=2.0"],
                  tokenizer=vq_run)
    check_run(run, out, vq_run)
    _, _, record, ema = load_checkpoint(run / "checkpoints" / "step_0000000")
    assert ema is None
    source = record["converted_from"]
    assert source["format"] == "llamagen-gpt" and source["sha256"] == file_sha256(src)
    assert source["entry"] == "model" and source["compiled_prefix"] and "gpt.py" in source["peer"]
    info = read_model_json(run)
    assert info["kind"] == "ar" and info["train_cache"] is None and info["parameters"] > 0
    sample = api.load_generator(run)[1]["config"].sample
    assert (sample.cfg_scale, sample.top_k, sample.cfg_until) == (2.0, 2000, None)  # sample_c2i.py's, overridden


def test_without_the_prefix_zeroing_the_logits_differ(vq_run, tmp_path):
    """The zero prefix RoPE is what makes the match: the same weights with the identity prefix differ."""
    out, meta = golden()
    torch.save(golden_state(meta), tmp_path / "gpt.pt")
    run = convert("llamagen-gpt", tmp_path / "gpt.pt", tmp_path / "run", ["model.heads=4"], tokenizer=vq_run)
    cfg = (run / "config.yaml").read_text().replace("prefix_rope: zero", "prefix_rope: identity")
    (run / "config.yaml").write_text(cfg)
    model, _ = api.load_generator(run)
    with torch.no_grad():
        gap = (model(out["tokens"], out["labels"]) - out["logits"]).abs().max()
    assert gap > 1e-2


def test_cli_converts_and_samples(vq_run, tmp_path, capsys):
    _, meta = golden()
    src = tmp_path / "gpt.safetensors"
    save_file(golden_state(meta), str(src))
    assert cli.main(["convert", "llamagen-gpt", str(src), "--tokenizer", str(vq_run), "--out",
                     str(tmp_path / "run"), "model.heads=4"]) == 0
    assert "config.yaml, model.json" in capsys.readouterr().out
    check_run(tmp_path / "run", golden()[0], vq_run)
    assert cli.main(["generator", "sample", str(tmp_path / "run"), "--num", "2", "--out",
                     str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    assert (tmp_path / "s.npz").is_file()


def test_a_wrong_file_is_one_line_naming_what_is_missing(vq_run, tmp_path, capsys):
    _, meta = vq_golden("vq8")
    torch.save({"model": vq_golden_state(meta)}, tmp_path / "vq.pt")
    with pytest.raises(ConversionError, match=r"is not a LlamaGen class-conditional GPT state dict: it has no "
                                              r"tok_embeddings\.weight, .*\(\d+ tensors, e\.g\. decoder\."):
        convert("llamagen-gpt", tmp_path / "vq.pt", tmp_path / "a", tokenizer=vq_run)
    assert cli.main(["convert", "llamagen-gpt", str(tmp_path / "vq.pt"), "--tokenizer", str(vq_run),
                     "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert error: ") and "tok_embeddings.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    _, gmeta = golden()
    state = golden_state(gmeta)
    torch.save(state, tmp_path / "gpt.pt")
    with pytest.raises(ConversionError, match=r"2 layers of width 64 is not one of LlamaGen's GPT shapes.*"
                                              r"model\.heads=N"):
        convert("llamagen-gpt", tmp_path / "gpt.pt", tmp_path / "c", tokenizer=vq_run)
    del state["layers.1.feed_forward.w3.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(ConversionError, match=r"it lacks layers\.1\.feed_forward\.w3\.weight; "
                                              r"it has tensors no LlamaGen GPT of this shape has: extra\.weight"):
        convert("llamagen-gpt", tmp_path / "cut.pt", tmp_path / "d", ["model.heads=4"], tokenizer=vq_run)


def test_arguments_are_checked_before_any_work(vq_run, tmp_path):
    src = tmp_path / "gpt.pt"
    src.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"needs --tokenizer RUN"):
        convert("llamagen-gpt", src, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"takes no --tokenizer"):
        convert("llamagen-vq", src, tmp_path / "run", tokenizer=vq_run)
    with pytest.raises(ConfigError, match=r"takes overrides of sample\.\*, model\.heads only \(got model\.width\)"):
        convert("llamagen-gpt", src, tmp_path / "run", ["model.width=8"], tokenizer=vq_run)
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        convert("llamagen-gpt", src, tmp_path / "run", tokenizer=tmp_path)
    _, meta = golden()
    other = tmp_path / "small_vocab.pt"
    state = golden_state(meta)
    state["tok_embeddings.weight"] = torch.zeros(32, 64)  # a 32-code GPT for a 64-code tokenizer: refused
    state["output.weight"] = torch.zeros(32, 64)
    torch.save(state, other)
    with pytest.raises(ConversionError, match="predicts 32 codes but the tokenizer run .* has a codebook of 64"):
        convert("llamagen-gpt", other, tmp_path / "run", ["model.heads=4"], tokenizer=vq_run)
