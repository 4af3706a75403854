"""The emoji presets: 64 px data sections, token / latent grids, near copies of their bases, the study spec,
and the architectures they name running on a 64 px batch (at tiny widths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twostage import config as configlib
from twostage.generators.ar.config import ARRunConfig
from twostage.generators.dit.config import DiTRunConfig
from twostage.metrics.reference import parse_reference
from twostage.study.spec import load_spec
from twostage.tokenizers.discriminator import PatchGAN
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.model import VQModel

SMALL = ["model.base_channels=8", "model.enc_res_blocks=1", "model.dec_res_blocks=1", "model.norm_groups=4"]


@pytest.mark.parametrize("preset, tokens", [("vq_emoji_f4", 256), ("vq_emoji_f8", 64), ("vq_emoji_f16", 16)])
def test_vq_presets_give_their_token_counts_at_64px(preset, tokens):
    cfg = configlib.load(VQRunConfig, preset)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.flip, cfg.loss.disc_layers) == ("emoji", 64, False, 3)
    assert (64 // cfg.model.downsample_factor) ** 2 == tokens
    if preset == "vq_emoji_f8":
        return  # the model runs for the extremes, f4 and f16 (a forward at 64 px costs ~1 s on a loaded CPU)
    model = VQModel(configlib.load(VQRunConfig, preset, SMALL + ["model.z_channels=8", "model.codebook_size=32"]).model)
    out = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.recon.shape == (2, 3, 64, 64) and out.quant.indices[0].numel() == tokens
    assert PatchGAN(3, 8, cfg.loss.disc_layers)(out.recon).shape[-1] >= 4  # a patch map, not a single logit


@pytest.mark.parametrize("preset, d", [("kl_emoji_f8d4", 4), ("kl_emoji_f8d16", 16), ("kl_emoji_f8d32", 32)])
def test_kl_presets_give_8x8_latents_with_d_channels(preset, d):
    cfg = configlib.load(KLRunConfig, preset)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.flip, cfg.vf.enabled) == ("emoji", 64, False, True)
    assert configlib.load(KLRunConfig, preset, ["vf.enabled=false"]).label() == f"kl f8d{d}"
    if d != 4:
        return  # the model runs once: d changes only the 1x1 convs around the latent
    model = KLModel(configlib.load(KLRunConfig, preset, SMALL).model)
    out = model(torch.rand(2, 3, 64, 64) * 2 - 1, sample=False)
    assert out.latent.shape == (2, d, 8, 8) and out.recon.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("cls, preset, base, overrides", [
    (VQRunConfig, "vq_emoji_f8", "vq_emoji_f4", ["model.channel_mult=[1, 2, 2, 4]"]),
    (VQRunConfig, "vq_emoji_f16", "vq_emoji_f4", ["model.channel_mult=[1, 1, 2, 2, 4]"]),
    (VQRunConfig, "vq_emoji_f4", "vq_fmnist_f4", ["data.name=emoji", "data.image_size=64", "data.flip=false",
                                                  "loss.perceptual_size=128", "loss.disc_layers=3"]),
    (KLRunConfig, "kl_emoji_f8d4", "kl_emoji_f8d16", ["model.spec=f8d4"]),
    (KLRunConfig, "kl_emoji_f8d32", "kl_emoji_f8d16", ["model.spec=f8d32"]),
    (ARRunConfig, "ar_emoji", "ar_fmnist_small", ["val.max_samples=2000"]),
    (DiTRunConfig, "dit_emoji", "dit_fmnist", ["val.max_samples=2000"]),
])  # fmt: skip
def test_near_copy_presets_are_their_base_plus_the_differences(cls, preset, base, overrides):
    assert configlib.load(cls, preset) == configlib.load(cls, base, overrides)


def test_study_spec_names_emoji_tokenizers_and_replicated_cells():
    # (build_plan over its 171 jobs takes ~15 s of config hashing; the spec's parts are checked here instead)
    spec = load_spec("study_emoji_tokens")
    assert parse_reference(spec.eval.reference).dataset == "emoji" and spec.budget_runs == "longest"
    assert (spec.seeds.tokenizer, spec.seeds.generator) == ([0, 1, 2], [0, 1, 2])
    assert spec.budgets == [800, 2000] and spec.generators["ar"].sizes == ["mini", "small"]
    tokens = []
    for tok in spec.tokenizers:
        cfg = configlib.load(VQRunConfig, tok.preset, [*spec.tokenizer.overrides, *tok.overrides])
        assert cfg.data.name == "emoji" and cfg.model.base_channels == 32  # half width: one device session
        tokens.append((cfg.image_size // cfg.model.downsample_factor) ** 2)
    assert tokens == [16, 64, 256]
    for size in spec.generators["ar"].sizes:
        configlib.load(ARRunConfig, spec.generators["ar"].preset, [f"model.size={size}"])
    text = (Path(configlib.__file__).parent / "presets" / "study_emoji_tokens.yaml").read_text()
    assert text.startswith("# Claim") and "twostage study run study_emoji_tokens" in text


def test_emoji_crt_spec_differs_only_in_the_crt_terms_and_plans_its_replicated_grid(tmp_path):
    """study_emoji_crt: the baseline and +CRT tokenizers are one emoji f8 config apart from CRT and the
    quantizer's entropy term (as study_crt's), and its grid plans 6 tokenizer runs and 24 generator runs."""
    from twostage.study.plan import build_plan

    spec = load_spec("study_emoji_crt")
    assert parse_reference(spec.eval.reference).dataset == "emoji" and spec.sample.labels == "train"
    base, crt = (configlib.load(VQRunConfig, t.preset, [*spec.tokenizer.overrides, *t.overrides])
                 for t in spec.tokenizers)
    assert (base.data.name, (64 // base.model.downsample_factor) ** 2) == ("emoji", 64)
    assert not base.crt.enabled and crt.crt.enabled and crt.model.entropy_weight > 0
    assert configlib.load(VQRunConfig, spec.tokenizers[0].preset,
                          [*spec.tokenizer.overrides, *spec.tokenizers[1].overrides,
                           f"crt.enabled={base.crt.enabled}", f"model.entropy_weight={base.model.entropy_weight}",
                           f"crt.ramp_steps={base.crt.ramp_steps}"]) == base
    plan = build_plan(spec, tmp_path / "study")
    assert len(plan.tokenizer_jobs) == 6 and len(plan.generator_jobs) == 2 * 2 * 2 * 3
    text = (Path(configlib.__file__).parent / "presets" / "study_emoji_crt.yaml").read_text()
    assert text.startswith("# Claim") and "twostage study run study_emoji_crt" in text
