"""`twostage convert lightningdit` (twostage/convert/lightningdit.py) against LightningDiT's own code.

The golden file tests/golden/lightningdit.safetensors was made by scripts/golden/lightningdit.py with
hustvl/LightningDiT at commit 2725fed42a14898744433809949834e26957bcdd (models/lightningdit.py, transport/):
a small LightningDiT with the published options (SwiGLU, RoPE, RMSNorm, AdaLN with shift; 2 blocks of
width 64, 4 heads, SwiGLU hidden 170, patch 2 on 8x8x4 latents, 10 classes + null row) with every
trainable weight filled (norm gains and AdaLN layers too), in float32: its velocity at 4 (x_t, t, label)
and its Euler sampler (num_steps 6, shift 0.3) from fixed noise; and the velocity of a variant with QK-norm
and AdaLN without shift at patch 1. Its weights are not stored: the VQ
test's `golden_tensor` fill rebuilds them (checked by the recorded sha256); its fixed buffers (the sin-cos
table and the RoPE tables) are stored as LightningDiT computed them. The test converts them (API and CLI)
with a KL run of 8x8x4 latents as --tokenizer, loads the run with twostage's loader and requires the same
velocity and the same samples with twostage's own sampler.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twostage import api, cli, config as configlib
from twostage.config import ConfigError
from twostage.convert import ConversionError, convert
from twostage.convert.lightningdit import fold_ada
from twostage.convert.run_folder import Converted, write_run
from twostage.engine.checkpoint import load_checkpoint
from twostage.generators.dit.model import LightningDiT, modulate
from twostage.generators.dit.task import generate_latents
from twostage.nn.layers import rms_norm
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel
from test_convert_llamagen_vq import golden_tensor, weights_sha256

GOLDEN = Path(__file__).parent / "golden" / "lightningdit.safetensors"
FIXED = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
# float32 against LightningDiT's float32 (|v| up to ~4, other operation order): measured gaps ~1e-6
TOL = {"atol": 2e-5, "rtol": 1e-5}


def golden() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
    return load_file(str(GOLDEN)), meta


def golden_state(variant: bool = False) -> dict[str, torch.Tensor]:
    """LightningDiT's state dict: the filled weights and the buffers it computed (of the variant: QK-norm,
    AdaLN without shift, patch 1)."""
    out, meta = golden()
    seed, prefix = int(meta["seed"]), "variant_" if variant else ""
    state = {key: golden_tensor(key, tuple(shape), seed) for key, shape in json.loads(meta[f"{prefix}state_keys"])}
    assert weights_sha256(state) == meta[f"{prefix}weights_sha256"], "the fill no longer gives the golden weights"
    return {**state, **{k: out[("variant." if variant else "") + k] for k in FIXED}}


def kl_run(out: Path, image_size: int, spec: str = "f4d4") -> Path:
    """A tiny KL tokenizer run (random weights) of image_size / 4 latents."""
    cfg = configlib.load(KLRunConfig, None, [f"data.image_size={image_size}", f"model.spec={spec}",
                                             "model.base_channels=8", "model.enc_res_blocks=1",
                                             "model.dec_res_blocks=1", "model.norm_groups=4"])
    torch.manual_seed(0)
    return write_run(out, Converted(config=cfg, modules={"tokenizer": KLModel(cfg.model)}, converted_from={}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lightningdit")
    stats = tmp / "latents_stats.pt"
    torch.save({"mean": torch.tensor([0.5, -0.2, 0.1, 0.0]).view(1, 4, 1, 1),
                "std": torch.tensor([2.0, 1.5, 0.5, 1.0]).view(1, 4, 1, 1)}, stats)
    return {"kl": kl_run(tmp / "kl", 32), "stats": stats}


def check_run(run: Path, kl: Path) -> LightningDiT:
    """The run's model computes LightningDiT's velocity, and twostage's sampler its samples."""
    out, meta = golden()
    model, info = api.load_generator(run)
    m = info["config"].model
    assert m.shape == (2, 64, 4) and (m.patch_size, m.time_scale, m.pos_order, m.ffn_multiple_of) == (2, 1.0, "col_row", 1)
    assert model.ffn_hidden == 170 and (info["channels"], info["num_classes"], list(info["grid"])) == (4, 10, [8, 8])
    assert info["tokenizer_run"] == str(kl.resolve()) and info["latent_std"] == [2.0, 1.5, 0.5, 1.0]
    s = info["config"].sample
    assert (s.steps, s.shift, s.cfg_interval_start, s.sampler) == (249, 0.3, 0.11, "euler")  # num_steps 250
    with torch.no_grad():
        torch.testing.assert_close(model(out["x_t"], out["t"], out["labels"]), out["velocity"], **TOL)
    # LightningDiT's num_steps N is N - 1 Euler steps of twostage's sampler on the same shifted grid
    steps = int(meta["sample_num_steps"]) - 1
    samples = generate_latents(model, out["sample_labels"], steps=steps, shift=float(meta["sample_timestep_shift"]),
                               noise=out["noise"])
    torch.testing.assert_close(samples, out["samples"], **TOL)
    return model


def test_converted_run_computes_what_lightningdit_computes(inputs, tmp_path):
    out, _ = golden()
    assert out["velocity"].abs().max() > 1 and out["velocity"].std() > 0.3  # a non-trivial network
    state = golden_state()
    src = tmp_path / "lightningdit.pt"
    # train.py's checkpoint: {"model" (DDP: "module." keys), "ema", "opt", "config"}; "ema" is converted
    torch.save({"model": {f"module.{k}": torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {},
                "config": {"model": {"model_type": "LightningDiT-tiny"}}}, src)
    run = convert("lightningdit", src, tmp_path / "run", ["sample.cfg_scale=2.0"], tokenizer=inputs["kl"],
                  latent_stats=inputs["stats"])
    check_run(run, inputs["kl"])
    _, _, record, ema = load_checkpoint(run / "checkpoints" / "step_0000000")
    source = record["converted_from"]
    assert ema is None and source["format"] == "lightningdit" and source["entry"] == "ema"
    assert source["dropped"] == list(FIXED) and "lightningdit.py" in source["peer"]
    assert api.load_generator(run)[1]["config"].sample.cfg_scale == 2.0


def test_each_option_is_needed_for_the_match(inputs, tmp_path):
    """time_scale, pos_order, the step count and the folded norm gains each change the output: the match is
    not luck."""
    out, _ = golden()
    save_file(golden_state(), str(tmp_path / "w.safetensors"))
    run = convert("lightningdit", tmp_path / "w.safetensors", tmp_path / "run", tokenizer=inputs["kl"],
                  latent_stats=inputs["stats"])
    model, info = api.load_generator(run)
    cfg = info["config"].model
    for change in ({"time_scale": 1000.0}, {"pos_order": "row_col"}):
        other = LightningDiT(dataclasses.replace(cfg, **change), 4, (8, 8), 10)
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other(out["x_t"], out["t"], out["labels"]) - out["velocity"]).abs().max() > 1e-2, change
    # LightningDiT's num_steps 6 is 5 steps: 6 twostage steps are another grid
    samples = generate_latents(model, out["sample_labels"], steps=6, shift=0.3, noise=out["noise"])
    assert (samples - out["samples"]).abs().max() > 1e-2
    state = golden_state()
    state["blocks.0.norm1.weight"] = torch.ones(64)  # without that gain, the output differs
    save_file(state, str(tmp_path / "g.safetensors"))
    run = convert("lightningdit", tmp_path / "g.safetensors", tmp_path / "g", tokenizer=inputs["kl"],
                  latent_stats=inputs["stats"])
    with torch.no_grad():
        gap = (api.load_generator(run)[0](out["x_t"], out["t"], out["labels"]) - out["velocity"]).abs().max()
    assert gap > 1e-2


def test_qk_norm_and_adaln_without_shift(inputs, tmp_path):
    """LightningDiT's other options: QK-norm gains (reordered with RoPE's pairs) and wo_shift (zero shift rows)."""
    out, meta = golden()
    assert json.loads(meta["variant"]) == {"patch_size": 1, "use_qknorm": True, "wo_shift": True}
    state = golden_state(variant=True)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (4 * 64, 64) and "blocks.0.attn.q_norm.weight" in state
    save_file(state, str(tmp_path / "v.safetensors"))
    run = convert("lightningdit", tmp_path / "v.safetensors", tmp_path / "run", tokenizer=inputs["kl"],
                  latent_stats=inputs["stats"])
    model, info = api.load_generator(run)
    assert info["config"].model.qk_norm and info["config"].model.patch_size == 1
    with torch.no_grad():
        torch.testing.assert_close(model(out["x_t"], out["t"], out["labels"]), out["variant.velocity"], **TOL)


def test_folding_a_norm_gain_and_inserting_shift_rows():
    """RMS(x) g (1 + scale) + shift == RMS(x) (1 + scale') + shift, also without shift rows (wo_shift)."""
    torch.manual_seed(0)
    w, c, x = 8, torch.randn(3, 8), torch.randn(3, 5, 8)
    g1, g2 = torch.rand(w) + 0.5, torch.rand(w) + 0.5
    for shift in (True, False):
        chunks = 6 if shift else 4
        weight, bias = torch.randn(chunks * w, w), torch.randn(chunks * w)
        parts = (c @ weight.T + bias).unsqueeze(1).chunk(chunks, -1)
        if not shift:
            zero = torch.zeros_like(parts[0])
            parts = (zero, parts[0], parts[1], zero, parts[2], parts[3])
        want = [modulate(rms_norm(x, 1e-6) * g, parts[i], parts[i + 1]) for g, i in ((g1, 0), (g2, 3))]
        fw, fb = fold_ada(weight, bias, {1: g1, 4: g2}, 6, shift)
        ours = (c @ fw.T + fb).unsqueeze(1).chunk(6, -1)
        got = [modulate(rms_norm(x, 1e-6), ours[i], ours[i + 1]) for i in (0, 3)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert torch.equal(ours[2], parts[2]) and torch.equal(ours[5], parts[5])  # gates untouched


def test_cli_converts_and_samples(inputs, tmp_path, capsys):
    src = tmp_path / "w.safetensors"
    save_file(golden_state(), str(src))
    assert cli.main(["convert", "lightningdit", str(src), "--tokenizer", str(inputs["kl"]), "--latent-stats",
                     str(inputs["stats"]), "--out", str(tmp_path / "run")]) == 0
    assert "config.yaml, model.json" in capsys.readouterr().out
    check_run(tmp_path / "run", inputs["kl"])
    assert cli.main(["generator", "sample", str(tmp_path / "run"), "--num", "2", "--steps", "2", "--out",
                     str(tmp_path / "s.npz"), "--device", "cpu", "--grid", "0"]) == 0
    assert (tmp_path / "s.npz").is_file()


def test_mistakes_are_one_line_naming_the_fix(inputs, tmp_path, capsys):
    state = golden_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"needs --latent-stats FILE"):
        convert("lightningdit", tmp_path / "w.safetensors", tmp_path / "a", tokenizer=inputs["kl"])
    with pytest.raises(ConfigError, match=r"takes no --latent-stats"):
        convert("llamagen-vq", tmp_path / "w.safetensors", tmp_path / "a", latent_stats=inputs["stats"])
    with pytest.raises(FileNotFoundError, match=r"latents_stats.pt"):
        convert("lightningdit", tmp_path / "w.safetensors", tmp_path / "a", tokenizer=inputs["kl"],
                latent_stats=tmp_path / "none.pt")
    # not a LightningDiT at all: one line through the CLI, nothing written
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
    assert cli.main(["convert", "lightningdit", str(tmp_path / "vae.safetensors"), "--tokenizer", str(inputs["kl"]),
                     "--latent-stats", str(inputs["stats"]), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert error: ") and "x_embedder.proj.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    # LayerNorm blocks (use_rmsnorm false) and a missing / extra tensor
    ln = {k: v for k, v in state.items() if ".norm1." not in k and ".norm2." not in k}
    save_file(ln, str(tmp_path / "ln.safetensors"))
    with pytest.raises(ConversionError, match=r"LayerNorm blocks \(use_rmsnorm: false\)"):
        convert("lightningdit", tmp_path / "ln.safetensors", tmp_path / "c", tokenizer=inputs["kl"],
                latent_stats=inputs["stats"])
    cut = dict(state)
    del cut["blocks.1.mlp.w3.bias"]
    cut["extra.weight"] = torch.zeros(1)
    save_file(cut, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ConversionError, match=r"it lacks blocks\.1\.mlp\.w3\.bias; it has tensors no LightningDiT "
                                              r"of this shape has: extra\.weight"):
        convert("lightningdit", tmp_path / "cut.safetensors", tmp_path / "d", tokenizer=inputs["kl"],
                latent_stats=inputs["stats"])
    # a tokenizer of other latents: its channels, or its grid (another image size)
    with pytest.raises(ConversionError, match=r"models latents of 4 channels but the tokenizer run .* latents of 8"):
        convert("lightningdit", tmp_path / "w.safetensors", tmp_path / "e", tokenizer=kl_run(tmp_path / "kl8", 32, "f4d8"),
                latent_stats=inputs["stats"])
    with pytest.raises(ConversionError, match=r"has 16 tokens \(its pos_embed\) but the tokenizer run's 4x4 latents"):
        convert("lightningdit", tmp_path / "w.safetensors", tmp_path / "f", tokenizer=kl_run(tmp_path / "kl16", 16),
                latent_stats=inputs["stats"])
    with pytest.raises(ConfigError, match=r"takes overrides of sample\.\*, model\.heads only \(got model\.width\)"):
        convert("lightningdit", tmp_path / "w.safetensors", tmp_path / "g", ["model.width=8"], tokenizer=inputs["kl"],
                latent_stats=inputs["stats"])
