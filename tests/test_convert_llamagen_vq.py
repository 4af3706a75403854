"""`twostage convert llamagen-vq` (twostage/convert/llamagen_vq.py) against LlamaGen's own code.

The golden files tests/golden/llamagen_vq{16,8}.safetensors were made by scripts/golden/llamagen_vq.py
with FoundationVision/LlamaGen at commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec
(tokenizer/tokenizer_image/vq_model.py): small-width models of the VQ-16 and VQ-8 layouts (base width
32, codebook 64, code dim 8, z channels 16) on 6 images of 32x32, with LlamaGen's pre-quantization
latents, code indices and images decoded from the codes, computed in float64. Their weights (4.4M
values, too many to commit) are not stored: `golden_state` rebuilds them from the key layout the golden
file records, with a fill that is the same on every platform, and the recorded sha256 checks that it
did. The test converts them (API and CLI), loads the run with twostage's loader and requires equal
codes, and latents and images within 2e-5 in float32 (CPU) and within 1e-10 with the converted model
in float64 (the two implementations compute the same function; only their float32 rounding differs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twostage import cli, load_tokenizer
from twostage.common.hashing import file_sha256
from twostage.config import ConfigError
from twostage.convert import FORMATS, ConversionError, convert
from twostage.engine.checkpoint import load_checkpoint
from twostage.tokenizers.vq.config import VQConfig

GOLDEN = Path(__file__).parent / "golden"
LAYOUTS = ("vq16", "vq8")
# float32 against the float64 reference: this random network's float32 rounding moves its decoded images by
# up to 7e-6 (either implementation; measured on 1 and 2 threads), so the bound leaves room for other CPUs' kernels.
TOL = {"atol": 2e-5, "rtol": 1e-5}
EXACT = {"atol": 1e-10, "rtol": 1e-10}  # float64 against float64: the same computation

_GOLDEN_RATIO, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def golden_values(name: str, count: int, seed: int) -> np.ndarray:
    """`count` values in [-1, 1), a pure function of (name, seed): splitmix64 of the element index in
    uint64 integer arithmetic, its top 24 bits scaled exactly. No RNG library, so no version changes them."""
    base = np.uint64((zlib.crc32(name.encode()) + (seed << 32)) % 2**64)
    with np.errstate(over="ignore"):
        z = base + (np.arange(count, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN_RATIO)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / 2**23 - 1.0


def golden_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A weight of a random-initialised network: norms near 1, small biases, weights ~ U(-b, b) with
    b = sqrt(3 / fan_in) (unit-variance outputs), codes in [-1, 1)."""
    u = golden_values(key, math.prod(shape), seed)
    if "norm" in key:
        values = 1.0 + 0.25 * u if key.endswith(".weight") else 0.1 * u
    elif key.endswith(".bias"):
        values = 0.05 * u
    elif "embedding" in key or len(shape) < 2:
        values = u
    else:
        values = u * math.sqrt(3.0 / math.prod(shape[1:]))
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def golden(layout: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = GOLDEN / f"llamagen_{layout}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def golden_state(meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The LlamaGen state dict the golden outputs were computed with (keys and shapes as recorded)."""
    seed = int(meta["seed"])
    state = {key: golden_tensor(key, tuple(shape), seed) for key, shape in json.loads(meta["state_keys"])}
    assert weights_sha256(state) == meta["weights_sha256"], "the fill no longer gives the golden weights"
    return state


def check_run(run: Path, out: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The run's tokenizer computes what LlamaGen's model computed: in float32 (as it runs) equal codes and
    values within 1e-5 of LlamaGen's float64 outputs; in float64 the same values up to float64 rounding."""
    tok = load_tokenizer(run)
    model = tok.model
    assert list(tok.config.model.channel_mult) == json.loads(meta["ch_mult"])
    assert (tok.config.model.codebook_size, tok.config.model.code_dim, tok.config.model.base_channels) == (64, 8, 32)
    images, indices = out["images"], out["indices"]
    assert torch.equal(tok.encode(images), indices)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latent(images).double(), out["latent"], **TOL)
        torch.testing.assert_close(model.decode_indices(indices).double(), out["decoded"], **TOL)
        torch.testing.assert_close(model(images).recon.double(), out["decoded"], **TOL)  # straight-through
        torch.testing.assert_close(tok.decode(indices).double(), out["decoded"].clamp(-1, 1), **TOL)
        model.double()
        assert torch.equal(model.encode(images.double()).indices, indices)
        torch.testing.assert_close(model.encode_latent(images.double()), out["latent"], **EXACT)
        torch.testing.assert_close(model.decode_indices(indices), out["decoded"], **EXACT)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_run_computes_what_llamagen_computes(layout, tmp_path):
    out, meta = golden(layout)
    state = golden_state(meta)
    src = tmp_path / "vq.pt"
    if layout == "vq16":  # a training checkpoint as LlamaGen's vq_train.py saves it, arguments included
        torch.save({"model": state, "steps": 0, "args": argparse.Namespace(vq_model="VQ-16", image_size=256)}, src)
    else:  # a bare state dict
        torch.save(state, src)
    run = convert("llamagen-vq", src, tmp_path / "run", ["data.image_size=32"])
    check_run(run, out, meta)
    if layout == "vq16":  # at LlamaGen's width, z channels and codebook it is twostage's default VQ model
        cfg = load_tokenizer(run).config.model
        assert replace(cfg, base_channels=128, z_channels=256, codebook_size=16384) == VQConfig()
    _, _, record, ema = load_checkpoint(run / "checkpoints" / "step_0000000")
    assert ema is None
    source = record["converted_from"]
    assert source["format"] == "llamagen-vq" and source["sha256"] == file_sha256(src)
    assert source["entry"] == ("model" if layout == "vq16" else "") and source["dropped"] == ["quantize.codebook_used"]
    assert "vq_model.py" in source["peer"]


def test_cli_converts_and_lists_the_formats(tmp_path, capsys):
    out, meta = golden("vq8")
    src = tmp_path / "vq8.safetensors"
    save_file(golden_state(meta), str(src))
    assert cli.main(["convert", "llamagen-vq", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "-> " + str(tmp_path / "run") in capsys.readouterr().out
    check_run(tmp_path / "run", out, meta)
    assert load_tokenizer(tmp_path / "run").config.data.image_size == 256  # LlamaGen's training size by default
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in FORMATS) and "vq_ds16_c2i.pt" in text and "vq_ds8_c2i.pt" in text


def test_encode_reads_the_data_named_at_conversion(tmp_path):
    from twostage import api
    from twostage.data.token_cache import read_meta

    _, meta = golden("vq16")
    torch.save({"model": golden_state(meta)}, tmp_path / "vq.pt")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=np.zeros(4, np.int64))
    run = convert("llamagen-vq", tmp_path / "vq.pt", tmp_path / "run",
                  ["data.name=npz", f"data.root={tmp_path / 'data.npz'}", "data.image_size=32"])
    cache = api.encode(run, "train", tmp_path / "cache", flip=False, device="cpu")
    info = read_meta(cache)
    assert (info.grid, info.codebook_size) == ((2, 2), 64)
    assert info.tokenizer_checksum == file_sha256(run / "checkpoints/step_0000000/model.safetensors")


def test_a_wrong_file_is_one_line_naming_what_is_missing(tmp_path, capsys):
    gpt = {"tok_embeddings.weight": torch.zeros(4, 2), "layers.0.attention.wqkv.weight": torch.zeros(6, 2)}
    torch.save({"model": gpt}, tmp_path / "gpt.pt")
    with pytest.raises(ConversionError, match=r"is not a LlamaGen VQ tokenizer state dict: it has no "
                                              r"encoder\.conv_in\.weight, .* \(2 tensors, e\.g\. layers\.0"):
        convert("llamagen-vq", tmp_path / "gpt.pt", tmp_path / "a")
    assert cli.main(["convert", "llamagen-vq", str(tmp_path / "gpt.pt"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert error: ") and "encoder.conv_in.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written

    _, meta = golden("vq8")
    state = golden_state(meta)
    del state["decoder.conv_blocks.1.res.2.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(ConversionError, match=r"it lacks decoder\.conv_blocks\.1\.res\.2\.conv2\.weight; "
                                              r"it has tensors no LlamaGen VQ model has: extra\.weight"):
        convert("llamagen-vq", tmp_path / "cut.pt", tmp_path / "c")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="cannot be read as a weights-only torch checkpoint"):
        convert("llamagen-vq", tmp_path / "notes.pt", tmp_path / "d")


def test_arguments_are_checked_before_any_work(tmp_path, capsys):
    src = tmp_path / "vq.pt"
    src.write_bytes(b"")
    with pytest.raises(ConfigError, match="format 'llamagen-vqq' is not known; did you mean 'llamagen-vq'"):
        convert("llamagen-vqq", src, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"takes overrides of data\.\* only \(got model\.\*\)"):
        convert("llamagen-vq", src, tmp_path / "run", ["model.codebook_size=8"])
    with pytest.raises(FileNotFoundError, match="download it first: https://huggingface.co/FoundationVision"):
        convert("llamagen-vq", tmp_path / "missing.pt", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("kind: vq\n")
    with pytest.raises(FileExistsError, match="is not empty; convert into a new folder"):
        convert("llamagen-vq", src, tmp_path / "run")
    assert cli.main(["convert", "llamagen-vq", str(src), "--out", str(src)]) == 1  # --out is a file
    assert "is an existing file, but this command writes a folder" in capsys.readouterr().err
