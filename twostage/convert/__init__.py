"""Published checkpoints of other projects as twostage run folders: `convert(format, src, out)`.

    import twostage.convert as tc
    tc.convert("llamagen-vq", "vq_ds16_c2i.pt", "runs/llamagen_vq16", ["data.name=folder", "data.root=/data/imagenet"])
    tok = twostage.load_tokenizer("runs/llamagen_vq16")
    tc.convert("llamagen-gpt", "c2i_B_256.pt", "runs/llamagen_gpt_b", tokenizer="runs/llamagen_vq16")
    gen, info = twostage.load_generator("runs/llamagen_gpt_b")
    tc.convert("vavae", "vavae-imagenet256-f16d32-dinov2.pt", "runs/vavae")   # also ldm-kl, diffusers-kl

A converted checkpoint is an ordinary run folder (config.yaml and checkpoints/step_0000000/, written by
twostage/convert/run_folder.py; a generator's also model.json, naming the tokenizer run given with
`tokenizer=` / `--tokenizer`, whose codes the generator's vocabulary are), so every command that reads a run (`tokenizer encode`, `eval recon`,
the API's loaders) works on it unchanged. The checkpoint's state records where the weights came from
({"converted_from": ...}). Each format is one module holding its key mapping; `FORMATS` lists them with
where their published weights are downloaded (`twostage convert --help` prints the table).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from twostage.common.errors import UserError
from twostage.config import ConfigError, parse_overrides


class ConversionError(UserError):
    """A file that is not a checkpoint of the format asked for, or that the format cannot hold."""


@dataclass(frozen=True)
class Format:
    name: str
    converter: str  # "module:function", imported on use: (src, overrides) -> run_folder.Converted
    summary: str  # one line for `--help`
    download: str  # where the published checkpoints are
    sections: tuple[str, ...] = ("data",)  # config sections a user may set (the rest comes from the weights)
    model_keys: tuple[str, ...] = ()  # model fields a user may set: what the weights' shapes cannot tell
    tokenizer: str = ""  # what --tokenizer must name, for a generator format ("": it takes none)
    latent_stats: str = ""  # what --latent-stats must name, for a format that needs it ("": it takes none)

    def converter_fn(self) -> Callable:
        module, _, attr = self.converter.partition(":")
        return getattr(importlib.import_module(module), attr)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(name="llamagen-vq", converter="twostage.convert.llamagen_vq:convert_llamagen_vq",
               summary="LlamaGen VQ-16 / VQ-8 image tokenizers (codebook 16384, code dim 8, l2-normalized codes) "
                       "-> a vq tokenizer run",
               download="https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt (VQ-16), "
                        "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds8_c2i.pt (VQ-8)"),
        Format(name="llamagen-gpt", converter="twostage.convert.llamagen_gpt:convert_llamagen_gpt",
               summary="LlamaGen class-conditional GPT-B / L / XL / XXL / XXXL (c2i_*.pt) -> an ar generator run "
                       "(needs --tokenizer: the VQ run whose codes it predicts, e.g. from llamagen-vq)",
               download="https://huggingface.co/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt (GPT-B, "
                        "256px with VQ-16; also c2i_L_256.pt, c2i_XL_384.pt, c2i_XXL_384.pt, c2i_3B_384.pt, "
                        "listed in LlamaGen's README)",
               sections=("sample",), model_keys=("heads",),
               tokenizer="the VQ tokenizer run whose codes the GPT predicts (e.g. `twostage convert llamagen-vq`)"),
        Format(name="lightningdit", converter="twostage.convert.lightningdit:convert_lightningdit",
               summary="LightningDiT-B / L / XL (also 1.0B, 1.6B; hustvl/LightningDiT) -> a dit generator run "
                       "(needs --tokenizer: the KL run of its latents, e.g. from vavae; and --latent-stats)",
               download="https://huggingface.co/hustvl/lightningdit-xl-imagenet256-800ep/resolve/main/"
                        "lightningdit-xl-imagenet256-800ep.pt (XL/1, also -64ep), with latents_stats.pt from "
                        "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/latents_stats.pt",
               sections=("sample",), model_keys=("heads",),
               tokenizer="the KL tokenizer run whose latents the DiT models (e.g. `twostage convert vavae`)",
               latent_stats="the channel-wise latent statistics it was trained with (LightningDiT's latents_stats.pt)"),
        Format(name="vavae", converter="twostage.convert.ldm_kl:convert_vavae",
               summary="VA-VAE f16d32 (hustvl/LightningDiT, the LDM KL autoencoder aligned to DINOv2) -> a kl "
                       "tokenizer run (alignment tensors dropped; model.encode_posterior=mean for mean latents)",
               download="https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/"
                        "vavae-imagenet256-f16d32-dinov2.pt",
               model_keys=("scaling_factor", "shift_factor", "encode_posterior")),
        Format(name="ldm-kl", converter="twostage.convert.ldm_kl:convert_ldm_kl",
               summary="LDM / Stable Diffusion KL autoencoders, original CompVis layout (encoder.down.0.block...; "
                       "also a full LatentDiffusion checkpoint's first_stage_model) -> a kl tokenizer run "
                       "(SD's latent space: model.scaling_factor=0.18215)",
               download="https://huggingface.co/stabilityai/sd-vae-ft-mse-original/resolve/main/"
                        "vae-ft-mse-840000-ema-pruned.safetensors (SD VAE); https://ommer-lab.com/files/"
                        "latent-diffusion/kl-f8.zip (LDM kl-f4 / f8 / f16 / f32, model.ckpt inside)",
               model_keys=("scaling_factor", "shift_factor", "encode_posterior")),
        Format(name="diffusers-kl", converter="twostage.convert.ldm_kl:convert_diffusers_kl",
               summary="diffusers AutoencoderKL (encoder.down_blocks.0.resnets...; its config.json beside the "
                       "weights gives norm groups and latent scaling) -> a kl tokenizer run",
               download="https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/"
                        "diffusion_pytorch_model.safetensors with config.json from the same folder (any "
                        "AutoencoderKL repository's vae/ folder)",
               model_keys=("scaling_factor", "shift_factor", "encode_posterior", "norm_groups")),
    )
}


def find_format(name: str) -> Format:
    """The format called `name`; an unknown name is a ConfigError naming the closest one and the list."""
    if name in FORMATS:
        return FORMATS[name]
    close = difflib.get_close_matches(name, list(FORMATS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"format {name!r} is not known{hint} Formats: {', '.join(FORMATS)}")


def check_overrides(fmt: Format, overrides: Sequence[str]) -> None:
    """Only the sections a format leaves to the user (data: what `encode` / `eval recon` read) may be set:
    the model section is read off the weights and must describe them exactly."""
    parsed = parse_overrides(list(overrides))
    bad = [f"{k}.*" for k in parsed if k not in fmt.sections and k != "model"]
    if "model" in parsed:
        model = parsed["model"] if isinstance(parsed["model"], dict) and fmt.model_keys else {"*": None}
        bad += [f"model.{k}" for k in model if k not in fmt.model_keys]
    if bad:
        allowed = ", ".join([f"{s}.*" for s in fmt.sections] + [f"model.{k}" for k in fmt.model_keys])
        raise ConfigError(f"convert {fmt.name} takes overrides of {allowed} only "
                          f"(got {', '.join(bad)}): the model section is read from the checkpoint")


def convert(format: str, src: str | Path, out: str | Path, overrides: Sequence[str] = (), *,
            tokenizer: str | Path | None = None, latent_stats: str | Path | None = None) -> Path:
    """Convert the published checkpoint `src` of `format` into the new run folder `out`; returns `out`.

    `tokenizer`: for a generator format (`Format.tokenizer`), the tokenizer run whose codes it models.
    `latent_stats`: for a format that needs them (`Format.latent_stats`), the file of the latent statistics
    the generator was trained with."""
    from twostage.common.hashing import file_sha256
    from twostage.convert.run_folder import check_out, write_run

    fmt = find_format(format)
    check_overrides(fmt, overrides)
    if fmt.tokenizer and tokenizer is None:
        raise ConfigError(f"convert {fmt.name} needs --tokenizer RUN: {fmt.tokenizer}")
    if not fmt.tokenizer and tokenizer is not None:
        raise ConfigError(f"convert {fmt.name} takes no --tokenizer (it converts a tokenizer)")
    if fmt.latent_stats and latent_stats is None:
        raise ConfigError(f"convert {fmt.name} needs --latent-stats FILE: {fmt.latent_stats}")
    if not fmt.latent_stats and latent_stats is not None:
        raise ConfigError(f"convert {fmt.name} takes no --latent-stats")
    if tokenizer is not None and not (Path(tokenizer) / "config.yaml").is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer} is not a run folder (it has no config.yaml)")
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a file (download it first: {fmt.download})")
    check_out(out)
    extra = {"tokenizer": Path(tokenizer)} if fmt.tokenizer else {}
    if fmt.latent_stats:
        extra["latent_stats"] = Path(latent_stats)
    converted = fmt.converter_fn()(src, list(overrides), **extra)
    converted.converted_from = {"format": fmt.name, "file": str(src.resolve()), "sha256": file_sha256(src),
                                **converted.converted_from}
    return write_run(out, converted)


__all__ = ["ConversionError", "Format", "FORMATS", "find_format", "check_overrides", "convert"]
