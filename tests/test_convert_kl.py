"""`twostage convert ldm-kl | vavae | diffusers-kl` (twostage/convert/ldm_kl.py) against the peers' own code.

The golden files were made from the peers' code on small-width models with weights filled by
`golden_tensor` (tests/test_convert_llamagen_vq.py; not stored, rebuilt here and checked by the recorded
sha256), 4 images of 32x32, in float64 (tests/golden/README.md):
  ldm_kl_f8, ldm_kl_f32  CompVis/latent-diffusion a506df5 ldm/models/autoencoder.py AutoencoderKL: SD's f8 VAE
                         (no level attention) and LDM's kl-f32 (attention at two levels)
  vavae_f16d32           hustvl/LightningDiT 2725fed tokenizer/autoencoder.py AutoencoderKL (VA-VAE's)
  diffusers_kl_sd, _flux diffusers 0.42.1 AutoencoderKL: SD's layout, and FLUX's (no quant convs, shift)
(scripts/golden/ldm_kl.py, scripts/golden/diffusers_kl.py). Each holds the posterior's mean and clamped
log-variance and the images decoded from the mean. The test converts the weights in the layout the
peer publishes them (training checkpoint, full LatentDiffusion checkpoint, diffusers folder), loads the run
with twostage's loader and requires the same values within 2e-5 in float32 and 1e-10 in float64.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twostage import api, cli, load_tokenizer
from twostage.common.hashing import file_sha256
from twostage.config import ConfigError
from twostage.convert import ConversionError, convert
from twostage.engine.checkpoint import load_checkpoint
from twostage.tokenizers.kl.config import KLModelConfig
from test_convert_llamagen_vq import golden_state

GOLDEN = Path(__file__).parent / "golden"
# float32 against the float64 reference (decoded |x| up to ~3.5): measured gaps up to ~2e-6.
TOL = {"atol": 2e-5, "rtol": 1e-5}
EXACT = {"atol": 1e-10, "rtol": 1e-10}  # float64 against float64: the same computation


def golden(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = GOLDEN / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def check_run(run: Path, out: dict[str, torch.Tensor]) -> None:
    """The run's model computes what the peer's computed: float32 within TOL of its float64 outputs, float64
    within float64 rounding (on the first two images: the same code path, half the time)."""
    tok = load_tokenizer(run)
    model, images = tok.model, out["images"]
    with torch.no_grad():
        posterior = model.encode(images)
        torch.testing.assert_close(posterior.mean.double(), out["mean"], **TOL)
        torch.testing.assert_close(posterior.logvar.double(), out["logvar"], **TOL)
        torch.testing.assert_close(model.decode(out["mean"].float()).double(), out["decoded"], **TOL)
        model.double()  # DiagonalGaussian holds float32 statistics, so the float64 moments are compared
        mean, logvar = model.quant_conv(model.encoder(images[:2].double())).chunk(2, dim=1)
        torch.testing.assert_close(mean, out["mean"][:2], **EXACT)
        torch.testing.assert_close(logvar.clamp(-30.0, 20.0), out["logvar"][:2], **EXACT)
        torch.testing.assert_close(model.decode(out["mean"][:2]), out["decoded"][:2], **EXACT)


def sampled(out: dict[str, torch.Tensor], scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """What a tokenizer with encode_posterior=sample returns first: a posterior sample with the noise of
    its generator (seed 0), in the scaled latent space."""
    noise = torch.randn(out["mean"].shape, generator=torch.Generator().manual_seed(0))
    return ((out["mean"].float() + torch.exp(0.5 * out["logvar"].float()) * noise) - shift) * scale


def source_record(run: Path) -> dict:
    _, _, state, _ = load_checkpoint(run / "checkpoints" / "step_0000000")
    return state["converted_from"]


@pytest.mark.parametrize("name", ["ldm_kl_f8", "ldm_kl_f32"])
def test_ldm_layout_computes_what_latent_diffusion_computes(name, tmp_path):
    out, meta = golden(name)
    state = golden_state(meta)
    src = tmp_path / "model.ckpt"
    if name == "ldm_kl_f8":  # an LDM autoencoder training checkpoint: loss tensors next to the model's
        extra = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4)}
        torch.save({"state_dict": {**state, **extra}, "global_step": 10, "epoch": 1}, src)
    else:  # a full LatentDiffusion checkpoint with scale_by_std's scale_factor buffer
        full = {f"first_stage_model.{k}": v for k, v in state.items()}
        full.update({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3), "scale_factor": torch.tensor(0.5)})
        torch.save({"state_dict": full}, src)
    run = convert("ldm-kl", src, tmp_path / "run", ["data.image_size=32"])
    check_run(run, out)
    ddconfig = json.loads(meta["ddconfig"])
    cfg = load_tokenizer(run).config.model
    assert list(cfg.levels) == ddconfig["ch_mult"] and cfg.latent_channels == int(meta["embed_dim"])
    assert (cfg.enc_res_blocks, cfg.dec_res_blocks) == (2, 3)  # LDM's decoder: num_res_blocks + 1
    assert list(cfg.attention_levels) == ([] if name == "ldm_kl_f8" else [4, 5])  # attn_resolutions at 256 px
    assert cfg.encode_posterior == "sample" and cfg.scaling_factor == (1.0 if name == "ldm_kl_f8" else 0.5)
    if name == "ldm_kl_f32":  # encode(): a posterior sample (LDM's get_first_stage_encoding), times scale_factor
        torch.testing.assert_close(load_tokenizer(run).encode(out["images"]), sampled(out, 0.5), **TOL)
    record = source_record(run)
    assert record["format"] == "ldm-kl" and record["entry"] == "state_dict" and record["sha256"] == file_sha256(src)
    if name == "ldm_kl_f8":
        assert record["dropped"] == ["loss.* (2 tensors)"]
    else:
        assert record["prefix"] == "first_stage_model." and record["other_tensors"] == 2


def test_vavae_computes_what_lightningdit_computes(tmp_path, capsys):
    out, meta = golden("vavae_f16d32")
    state = golden_state(meta)
    # vavae-imagenet256-f16d32-dinov2.pt's layout: LDM's Lightning checkpoint of VA-VAE's AutoencoderKL with
    # use_vf=dinov2, reverse_proj=true (vavae/ldm/models/autoencoder.py), loss tensors included
    extra = {"foundation_model.model.cls_token": torch.zeros(1, 1, 8),
             "foundation_model.model.blocks.0.attn.qkv.weight": torch.zeros(24, 8),
             "linear_proj.weight": torch.zeros(8, 32, 1, 1), "loss.logvar": torch.zeros(())}
    src = tmp_path / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save({"state_dict": {**state, **extra}, "global_step": 0}, src)
    run = convert("vavae", src, tmp_path / "run", ["data.image_size=32"])
    check_run(run, out)
    tok = load_tokenizer(run)
    # encode(): a posterior sample, as LightningDiT's extract_features.py encodes; reconstruct() decodes the mean
    assert tok.config.model.encode_posterior == "sample"
    z = tok.encode(out["images"][:2])
    torch.testing.assert_close(z, sampled(out)[:2], **TOL)
    with torch.no_grad():
        recon = tok.model.decode(tok.model.encode(out["images"][:2]).mean).clamp(-1, 1)
    torch.testing.assert_close(tok.reconstruct(out["images"][:2]), recon)
    # at VA-VAE's width it is twostage's own default KL model (f16d32, LDM's levels and blocks)
    assert replace(tok.config.model, base_channels=128, channel_mult=None, encode_posterior="mean") == KLModelConfig()
    assert tok.config.data.image_size == 32 and not tok.config.vf.enabled
    record = source_record(run)
    assert record["format"] == "vavae" and "LightningDiT" in record["peer"]
    assert record["dropped"] == ["foundation_model.* (2 tensors)", "linear_proj.* (1 tensors)", "loss.* (1 tensors)"]
    # the ldm-kl format names the right one instead of listing DINOv2's tensors as unknown
    save_file({**state, **extra}, str(tmp_path / "vavae.safetensors"))
    assert cli.main(["convert", "ldm-kl", str(tmp_path / "vavae.safetensors"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "foundation_model.model.blocks" in err and "use `twostage convert vavae`" in err


def write_diffusers(folder: Path, meta: dict[str, str], state: dict[str, torch.Tensor] | None = None,
                    config: bool = True, name: str = "diffusion_pytorch_model.safetensors") -> Path:
    """A diffusers model folder as save_pretrained leaves it: config.json and the weights."""
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(meta["config"])
    state = golden_state(meta) if state is None else state
    if name.endswith(".safetensors"):
        save_file(state, str(folder / name))
    else:
        torch.save(state, folder / name)
    return folder / name


@pytest.mark.parametrize("name", ["diffusers_kl_sd", "diffusers_kl_flux"])
def test_diffusers_layout_computes_what_diffusers_computes(name, tmp_path, capsys):
    out, meta = golden(name)
    config = json.loads(meta["config"])
    src = write_diffusers(tmp_path / "vae", meta)
    assert cli.main(["convert", "diffusers-kl", str(src), "--out", str(tmp_path / "run"), "data.image_size=32",
                     "model.encode_posterior=mean"]) == 0
    assert "-> " + str(tmp_path / "run") in capsys.readouterr().out
    run = tmp_path / "run"
    check_run(run, out)
    tok = load_tokenizer(run)
    cfg = tok.config.model
    assert cfg.norm_groups == config["norm_num_groups"] == 8 and cfg.latent_channels == config["latent_channels"]
    assert cfg.quant_conv == cfg.post_quant_conv == config["use_quant_conv"]
    scale, shift = config["scaling_factor"], config["shift_factor"] or 0.0
    assert (cfg.scaling_factor, cfg.shift_factor) == (scale, shift)
    # encode() gives the latent a diffusers pipeline hands its transformer: (mean - shift) * scale
    z = tok.encode(out["images"])
    torch.testing.assert_close(z.double(), (out["mean"] - shift) * scale, **TOL)
    torch.testing.assert_close(tok.decode(z).double(), out["decoded"].clamp(-1, 1), **TOL)
    assert source_record(run)["config"] == str(tmp_path / "vae" / "config.json")


def converted_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "step_0000000" / "model.safetensors"))


def test_diffusers_older_attention_names_and_missing_config(tmp_path):
    _, meta = golden("diffusers_kl_sd")
    state = golden_state(meta)
    reference = converted_weights(convert("diffusers-kl", write_diffusers(tmp_path / "vae", meta, state),
                                          tmp_path / "run", ["data.image_size=32"]))
    # diffusers before 0.14 named the attention query / key / value / proj_attn (and still loads them)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in state.items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in old
    src = write_diffusers(tmp_path / "old", meta, old, name="diffusion_pytorch_model.bin")
    weights = converted_weights(convert("diffusers-kl", src, tmp_path / "old_run", ["data.image_size=32"]))
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    # without config.json: diffusers' defaults (32 groups, scaling 0.18215); the groups, which shapes cannot
    # tell, may be given (the golden test above shows 8 groups from config.json is exact)
    bare = write_diffusers(tmp_path / "bare", meta, state, config=False)
    cfg = load_tokenizer(convert("diffusers-kl", bare, tmp_path / "r32", ["data.image_size=32"])).config.model
    assert (cfg.norm_groups, cfg.scaling_factor, cfg.shift_factor) == (32, 0.18215, 0.0)
    run = convert("diffusers-kl", bare, tmp_path / "r8", ["data.image_size=32", "model.norm_groups=8",
                                                          "model.scaling_factor=0.3", "model.encode_posterior=mean"])
    cfg = load_tokenizer(run).config.model
    assert (cfg.norm_groups, cfg.scaling_factor, cfg.encode_posterior) == (8, 0.3, "mean")
    assert source_record(run)["config"] is None


def test_wrong_files_are_one_line_naming_the_fix(tmp_path, capsys):
    _, meta = golden("ldm_kl_f8")
    ldm = golden_state(meta)
    save_file(ldm, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(ConversionError, match=r"does not hold diffusers AutoencoderKL weights: it has no "
                                              r"encoder\.down_blocks\.0\.resnets\.0\.conv1\.weight.*use `twostage "
                                              r"convert ldm-kl`"):
        convert("diffusers-kl", tmp_path / "ldm.safetensors", tmp_path / "a")
    _, dmeta = golden("diffusers_kl_sd")
    src = write_diffusers(tmp_path / "vae", dmeta)
    assert cli.main(["convert", "ldm-kl", str(src), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert error: ") and "use `twostage convert diffusers-kl`" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()

    gpt = {"tok_embeddings.weight": torch.zeros(4, 2)}
    torch.save({"model": gpt}, tmp_path / "gpt.pt")
    with pytest.raises(ConversionError, match=r"does not hold LDM KL autoencoder weights: it has no "
                                              r"encoder\.conv_in\.weight, .* \(1 tensor, e\.g\. tok_embeddings"):
        convert("ldm-kl", tmp_path / "gpt.pt", tmp_path / "c")
    cut = dict(ldm)
    del cut["decoder.up.1.block.2.conv2.weight"]
    torch.save(cut, tmp_path / "cut.pt")
    with pytest.raises(ConversionError, match=r"it lacks decoder\.up\.1\.block\.2\.conv2\.weight"):
        convert("ldm-kl", tmp_path / "cut.pt", tmp_path / "d")
    # attention in the encoder's lowest level only: one layout for both is all twostage's model has
    odd = dict(ldm)
    for part in ("norm", "q", "k", "v", "proj_out"):
        for p in ("weight", "bias"):
            odd[f"encoder.down.3.attn.0.{part}.{p}"] = ldm[f"encoder.mid.attn_1.{part}.{p}"]
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(ConversionError, match=r"attention at levels \[3\] .* in the encoder but \[\] .* decoder"):
        convert("ldm-kl", tmp_path / "odd.pt", tmp_path / "e")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file(golden_state(dmeta), str(tmp_path / "unet" / "w.safetensors"))
    with pytest.raises(ConversionError, match="describes a diffusers UNet2DConditionModel, not an AutoencoderKL"):
        convert("diffusers-kl", tmp_path / "unet" / "w.safetensors", tmp_path / "f")
    # the architecture is read from the weights: only what they cannot tell may be set
    with pytest.raises(ConfigError, match=r"convert ldm-kl takes overrides of data\.\*, model\.scaling_factor, "
                                          r"model\.shift_factor, model\.encode_posterior only "
                                          r"\(got model\.base_channels\)"):
        convert("ldm-kl", tmp_path / "ldm.safetensors", tmp_path / "g", ["model.base_channels=64"])


def test_converted_run_encodes_evaluates_and_is_a_study_preset(tmp_path):
    """A tiny converted model (SD's f8 layout at width 32) on Fashion-MNIST at 32 px: a latent cache,
    eval recon, and its config.yaml as a study's tokenizer preset."""
    from twostage.data.token_cache import read_meta
    from twostage.study.plan import build_plan
    from twostage.study.spec import load_spec

    _, meta = golden("ldm_kl_f8")
    save_file(golden_state(meta), str(tmp_path / "vae.safetensors"))
    run = convert("ldm-kl", tmp_path / "vae.safetensors", tmp_path / "run",
                  ["data.name=fashion-mnist", "data.image_size=32", "data.resize=pad", "model.scaling_factor=0.18215"])
    cache = api.encode(run, "train", tmp_path / "cache", limit=24, batch_size=12, device="cpu")
    info = read_meta(cache)
    assert info.kind == "latents" and info.grid == (4, 4) and info.channels == 4 and len(info.latent_std) == 4
    assert info.tokenizer_checksum == file_sha256(run / "checkpoints/step_0000000/model.safetensors")
    result = api.evaluate_reconstruction(run, max_images=8, batch_size=8, perceptual=False, device="cpu",
                                         uniformity_vectors=0, out=tmp_path / "recon.json")
    assert np.isfinite(result["metrics"]["PSNR"]) and result["protocol"]["extra"]["tokenizer_kind"] == "kl"
    spec = load_spec({"name": "converted", "tokenizers": [{"preset": str(run / "config.yaml"),
                                                           "overrides": ["loss.perceptual=none"]}],
                      "generators": {"dit": {"preset": "dit_fmnist", "sizes": ["tiny"]}}, "budgets": [10],
                      "tokenizer": {"steps": 5}})
    plan = build_plan(spec, tmp_path / "study")
    tok_job = next(job for job in plan.jobs if job.kind == "tokenizer")
    assert str(run / "config.yaml") in tok_job.stages[0].argv


def test_the_new_model_fields_leave_trained_runs_as_they_are():
    """Defaults: config.yaml and config hash without the new fields, the same network and initialization;
    set: the layouts the converters need, checked before any work."""
    from twostage import config as configlib
    from twostage.tokenizers.kl.config import KLRunConfig
    from twostage.tokenizers.kl.model import KLModel

    new = {"attn_levels", "z_channels", "quant_conv", "post_quant_conv", "scaling_factor", "shift_factor",
           "encode_posterior"}
    assert not new & set(configlib.to_dict(configlib.load(KLRunConfig, "kl_fmnist_f4d8"))["model"])
    tiny = ["model.spec=f4d4", "model.base_channels=8", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
            "model.norm_groups=4"]

    def build(*extra):
        torch.manual_seed(0)
        return KLModel(configlib.load(KLRunConfig, None, tiny + list(extra)).model)

    plain, lowest = build().state_dict(), build("model.attn_levels=[2]").state_dict()  # [2]: the default, explicit
    assert list(plain) == list(lowest) and all(torch.equal(plain[k], lowest[k]) for k in plain)
    levels = build("model.attn_levels=[0,2]")
    assert [len(level.attns) for level in levels.encoder.levels] == [1, 0, 1]
    assert [len(level.attns) for level in levels.decoder.levels] == [1, 0, 1]  # lowest resolution first
    assert not any(len(level.attns) for level in build("model.attn_levels=[]").encoder.levels)
    wide = build("model.z_channels=8")
    assert wide.encoder.conv_out.out_channels == 16 and tuple(wide.quant_conv.weight.shape[:2]) == (8, 16)
    assert tuple(wide.post_quant_conv.weight.shape[:2]) == (8, 4) and wide.decoder.conv_in.in_channels == 8
    assert wide(torch.zeros(1, 3, 16, 16)).latent.shape == (1, 4, 4, 4)
    bare = build("model.quant_conv=false", "model.post_quant_conv=false")
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in bare.state_dict())
    with pytest.raises(ConfigError, match=r"model\.attn_levels=\[3\] must list distinct levels 0\.\.2"):
        configlib.load(KLRunConfig, None, tiny + ["model.attn_levels=[3]"])
    with pytest.raises(ConfigError, match=r"model\.quant_conv=false needs model\.z_channels equal to the latent"):
        configlib.load(KLRunConfig, None, tiny + ["model.quant_conv=false", "model.z_channels=8"])
