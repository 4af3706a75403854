"""KL autoencoders of LDM / Stable Diffusion, VA-VAE and diffusers as twostage `kl` tokenizer runs.

Three formats, one mapping. The original layout (`ldm-kl`) is CompVis' AutoencoderKL
(ldm/models/autoencoder.py with ldm/modules/diffusionmodules/model.py's Encoder / Decoder), which the
Stable Diffusion VAEs and VA-VAE (`vavae`: hustvl/LightningDiT tokenizer/autoencoder.py, "exactly the
same architecture as the LDM VAE") use. diffusers' AutoencoderKL (`diffusers-kl`) is the same network
under other names: its keys are first renamed to the LDM layout (`ldm_state`), then everything goes
through the LDM path. The conversions are checked against the peers' own code by
tests/test_convert_kl.py (golden files made by scripts/golden/ldm_kl.py and scripts/golden/diffusers_kl.py).

twostage's KL model is the same network (twostage/tokenizers/kl/, the trunk of twostage/tokenizers/conv.py);
what the LDM layout and twostage's differ in:

- layout: `down.<i>.block / .attn / .downsample` are `levels.<i>.blocks / .attns / .resample`; the
  decoder's `up.<i>` is indexed by resolution (0 = full) where twostage's decoder levels run lowest
  resolution first, so `up.<i>` is `levels.<L-1-i>`; `mid.block_1 / attn_1 / block_2` are
  `mid.res1 / attn / res2`; `nin_shortcut` is `shortcut`.
- attention: separate 1x1 q, k, v convs become one fused qkv conv (queries, keys, values along the output
  channels); `proj_out` is `proj`. Linear-shaped (C, C) attention weights (diffusers) are 1x1 convs.
- architecture, read off the tensors: base width, channel multipliers (the encoder's and decoder's must
  agree), ResBlocks per level (LDM's decoder has num_res_blocks + 1), which levels have attention
  (`attn_levels`, from LDM's attn_resolutions; the encoder's and decoder's must agree), mid-block attention
  (absent with LDM's attn_type "none" or diffusers' mid_block_add_attention=False), z channels and latent
  channels (LDM's z_channels and embed_dim), whether quant_conv / post_quant_conv exist. What tensors do not
  say is fixed by the peers' code and set explicitly: GroupNorm eps 1e-6 and 32 groups (LDM's `Normalize`;
  diffusers' norm_num_groups from its config.json), one attention head scaled by C^-1/2, dropout 0, the
  posterior's log-variance clamped to [-30, 20]. LDM's AutoencoderKL requires double_z (mean and
  log-variance), so an encoder with an odd output width is refused.
- dropped, and recorded in the run's checkpoint state: training-only tensors (`loss.*`: LPIPS,
  discriminator, learned log-variance; `model_ema.*`), and for VA-VAE the vision-foundation alignment
  (`foundation_model.*`, the frozen DINOv2; `linear_proj.*`, the VF projection), which LightningDiT's own
  loader leaves out too. A full LatentDiffusion checkpoint (keys `first_stage_model.*`) gives its autoencoder.
- latent space and encoding (model.scaling_factor / shift_factor / encode_posterior, which a user may set):
  LDM and LightningDiT sample the posterior when encoding for their diffusion models, so the converted runs
  do ("model.encode_posterior=mean" for deterministic caches). SD's diffusion models see z * 0.18215, a
  number of the diffusion model's config, not of the autoencoder checkpoint: `ldm-kl` takes a
  LatentDiffusion `scale_factor` tensor when the file has one, else 1 (give model.scaling_factor=0.18215
  for SD's latent space). diffusers keeps scaling_factor / shift_factor in the config.json next to the
  weights; it is read when present (else diffusers' defaults 0.18215 / none). VA-VAE's normalization is
  per channel, (z - mean_c) / std_c over the training latents (LightningDiT's latent_norm with multiplier
  1), which twostage's DiT does with its cache's channel statistics, so its scaling stays 1.

The published autoencoders were trained at 256x256 (ImageNet / OpenImages / LAION), so the run's data
section defaults to image_size 256 with resize_crop; `data.*` overrides name the data `encode` and
`eval recon` read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

from twostage import config as configlib
from twostage.convert import ConversionError
from twostage.convert.run_folder import Converted
from twostage.convert.source import channel_mult, gather_state, listing, read_state_dict, split_fused_qkv
from twostage.tokenizers.base import MODULE
from twostage.tokenizers.kl.config import KLRunConfig
from twostage.tokenizers.kl.model import KLModel

LDM_PEER = "CompVis/latent-diffusion ldm/models/autoencoder.py (AutoencoderKL), ldm/modules/diffusionmodules/model.py"
VAVAE_PEER = "hustvl/LightningDiT tokenizer/autoencoder.py (AutoencoderKL, model_type vavae), tokenizer/vavae.py"
DIFFUSERS_PEER = "huggingface/diffusers models/autoencoders/autoencoder_kl.py (AutoencoderKL)"
ENTRIES = ("state_dict", "model", "ema")  # LDM / LightningDiT save under "state_dict"
DATA = {"image_size": 256, "resize": "resize_crop"}
FULL_LDM_PREFIX = "first_stage_model."  # a LatentDiffusion checkpoint's autoencoder
TRAINING_ONLY = ("loss.", "model_ema.")
VF_ALIGNMENT = ("foundation_model.", "linear_proj.")  # VA-VAE's training-time alignment to DINOv2
LDM_ANCHORS = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.conv_out.weight",
               "decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight", "decoder.conv_out.weight")
DIFFUSERS_ANCHORS = ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight",
                     "encoder.conv_out.weight", "decoder.conv_in.weight",
                     "decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.conv_out.weight")
LDM_NORM_GROUPS = 32  # ldm/modules/diffusionmodules/model.py Normalize(in_channels, num_groups=32)
# diffusers' AutoencoderKL defaults, for a config.json that leaves them out
DIFFUSERS_DEFAULTS = {"scaling_factor": 0.18215, "shift_factor": None, "norm_num_groups": 32}

# -- twostage <-> LDM keys -----------------------------------------------------------------------------

LEVEL_KEY = re.compile(r"^(encoder|decoder)\.levels\.(\d+)\.(blocks|attns|resample)\.")
RENAMES = (
    (r"\.mid\.res1\.", ".mid.block_1."),
    (r"\.mid\.attn\.", ".mid.attn_1."),
    (r"\.mid\.res2\.", ".mid.block_2."),
    (r"\.shortcut\.", ".nin_shortcut."),
    (r"\.proj\.", ".proj_out."),
)
ATTN_WEIGHT = re.compile(r"\.(q|k|v|proj_out)\.weight$")


def peer_keys(key: str, levels: int) -> list[str]:
    """The LDM key(s) a twostage key of a `levels`-level model is made of: q, k, v for the fused
    attention conv, else one."""
    m = LEVEL_KEY.match(key)
    if m:
        side, k, part = m.group(1), int(m.group(2)), m.group(3)
        encoder = side == "encoder"
        index = k if encoder else levels - 1 - k
        name = {"blocks": "block", "attns": "attn", "resample": "downsample" if encoder else "upsample"}[part]
        key = f"{side}.{'down' if encoder else 'up'}.{index}.{name}.{key[m.end():]}"
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    return split_fused_qkv(key)


# -- diffusers -> LDM keys -----------------------------------------------------------------------------

DIFFUSERS_LEVEL = re.compile(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|attentions|downsamplers\.0|"
                             r"upsamplers\.0)\.")
DIFFUSERS_RENAMES = (
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),  # diffusers' is the 1x1 (LDM's conv_shortcut would be 3x3)
    (r"\.group_norm\.", ".norm."),
    (r"\.(to_q|query)\.", ".q."),  # query / key / value / proj_attn: diffusers before 0.14, still loaded by it
    (r"\.(to_k|key)\.", ".k."),
    (r"\.(to_v|value)\.", ".v."),
    (r"\.(to_out\.0|proj_attn)\.", ".proj_out."),
)


def ldm_name(key: str, levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL key (`levels`: how many up blocks the decoder has)."""
    m = DIFFUSERS_LEVEL.match(key)
    if m:
        side, k, part = m.group(1), int(m.group(2)), m.group(3)
        index = k if side == "encoder.down" else levels - 1 - k  # diffusers' up_blocks run lowest resolution first
        name = {"resnets": "block", "attentions": "attn", "downsamplers.0": "downsample",
                "upsamplers.0": "upsample"}[part]
        key = f"{side}.{index}.{name}.{key[m.end():]}"
    for pattern, repl in DIFFUSERS_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def ldm_state(state: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict renamed to the LDM layout."""
    _require_layout(state, src, "diffusers AutoencoderKL", DIFFUSERS_ANCHORS, LDM_ANCHORS,
                    "the original LDM layout (encoder.down.0.block...): use `twostage convert ldm-kl`")
    levels = _count(state, "decoder.up_blocks.{}.resnets.0.conv1.weight")
    out = {}
    for key, value in state.items():
        name = ldm_name(key, levels)
        if name in out:
            raise ConversionError(f"{src} holds {key} in both the old and the new attention names")
        out[name] = value
    return out


# -- reading the architecture ----------------------------------------------------------------------------


def _found(state: dict[str, torch.Tensor]) -> str:
    return f"{len(state)} tensor{'' if len(state) == 1 else 's'}, e.g. {listing(sorted(state), 3) or 'none'}"


def _require_layout(state: dict[str, torch.Tensor], src: Path, what: str, anchors: Sequence[str],
                    other: Sequence[str], other_layout: str) -> None:
    """A ConversionError unless `state` has every key of `anchors`; it points to the other converter when
    the keys are those of the `other` layout."""
    missing = [k for k in anchors if k not in state]
    if missing:
        hint = f" It has {other_layout}." if all(k in state for k in other) else ""
        raise ConversionError(f"{src} does not hold {what} weights: it has no {listing(missing)} "
                              f"({_found(state)}).{hint}")


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def select(state: dict[str, torch.Tensor], drop: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(the autoencoder's tensors, a record of what was left out): a full LatentDiffusion checkpoint's
    `first_stage_model.*`, without the prefixes in `drop`."""
    record: dict = {}
    if any(k.startswith(FULL_LDM_PREFIX) for k in state):
        record["prefix"] = FULL_LDM_PREFIX
        record["other_tensors"] = sum(not k.startswith(FULL_LDM_PREFIX) for k in state)
        state = {k[len(FULL_LDM_PREFIX):]: v for k, v in state.items() if k.startswith(FULL_LDM_PREFIX)}
    dropped = sorted({p for k in state for p in drop if k.startswith(p)})
    record["dropped"] = [f"{p}* ({sum(k.startswith(p) for k in state)} tensors)" for p in dropped]
    return {k: v for k, v in state.items() if not k.startswith(tuple(drop))}, record


def architecture(state: dict[str, torch.Tensor], src: Path, what: str) -> dict:
    """The `model` section (KLModelConfig fields) of the LDM-layout autoencoder whose weights `state` holds."""
    _require_layout(state, src, what, LDM_ANCHORS, DIFFUSERS_ANCHORS,
                    "diffusers' layout (encoder.down_blocks...): use `twostage convert diffusers-kl`")
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = _count(state, "encoder.down.{}.block.0.conv1.weight")
    encoder = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    decoder = [state[f"decoder.up.{i}.block.0.conv1.weight"].shape[0]
               for i in range(_count(state, "decoder.up.{}.block.0.conv1.weight"))]
    mult = channel_mult(encoder, decoder, base, src, "kl")
    attn = {side: [i for i in range(levels) if f"{side}.{group}.{i}.attn.0.q.weight" in state]
            for side, group in (("encoder", "down"), ("decoder", "up"))}
    mid = {side: f"{side}.mid.attn_1.q.weight" in state for side in ("encoder", "decoder")}
    if attn["encoder"] != attn["decoder"] or mid["encoder"] != mid["decoder"]:
        raise ConversionError(f"{src}: attention at levels {attn['encoder']} (mid: {mid['encoder']}) in the encoder "
                              f"but {attn['decoder']} (mid: {mid['decoder']}) in the decoder; twostage's kl model "
                              "has one attention layout for both")
    moments = state["encoder.conv_out.weight"].shape[0]
    if moments % 2:
        raise ConversionError(f"{src}: the encoder emits {moments} channels, not a mean and a log-variance "
                              "(LDM's double_z); only KL autoencoders convert")
    z = moments // 2
    quant, post = "quant_conv.weight" in state, "post_quant_conv.weight" in state
    d = state["quant_conv.weight"].shape[0] // 2 if quant else z
    model = {
        "spec": f"f{2 ** (levels - 1)}d{d}", "in_channels": in_channels,
        "out_channels": state["decoder.conv_out.weight"].shape[0], "base_channels": base,
        "channel_mult": mult,
        "enc_res_blocks": _count(state, "encoder.down.0.block.{}.conv1.weight"),
        "dec_res_blocks": _count(state, "decoder.up.0.block.{}.conv1.weight"),
        "norm_groups": LDM_NORM_GROUPS, "attn_heads": 1, "mid_attn": mid["encoder"], "dropout": 0.0,
        "quant_conv": quant, "post_quant_conv": post,
    }
    if attn["encoder"] != [levels - 1]:  # the default (None) is attention at the lowest resolution only
        model["attn_levels"] = attn["encoder"]
    if z != d:
        model["z_channels"] = z
    return model


def mapped_state(model: KLModel, state: dict[str, torch.Tensor], src: Path, what: str) -> dict[str, torch.Tensor]:
    """`model`'s state dict filled from the LDM-layout tensors; every tensor of `state` used."""
    ours = model.state_dict()
    levels = len(model.cfg.levels)
    # (C, C) attention projections (diffusers' Linear layers) are the 1x1 convs of the LDM layout.
    state = {k: v[:, :, None, None] if ATTN_WEIGHT.search(k) and v.ndim == 2 else v for k, v in state.items()}
    return gather_state(ours, {key: peer_keys(key, levels) for key in ours}, state, src, what)


def build(state: dict[str, torch.Tensor], src: Path, overrides: Sequence[str], what: str, model: dict,
          record: dict) -> Converted:
    """The kl run of LDM-layout weights: `model` holds what the format sets beyond the architecture."""
    source = {"kind": "kl", "model": {**architecture(state, src, what), **model}, "data": DATA,
              # The VF loss trains the encoder; a converted run is for inference (and its projection is dropped).
              "vf": {"enabled": False}}
    cfg = configlib.load(KLRunConfig, source, list(overrides))
    net = KLModel(cfg.model)
    net.load_state_dict(mapped_state(net, state, src, what), strict=True)
    return Converted(config=cfg, modules={MODULE: net}, converted_from=record)


def _scale_factor(state: dict[str, torch.Tensor]) -> float:
    """LatentDiffusion's `scale_factor` when the checkpoint holds it (a buffer with scale_by_std), else 1."""
    value = state.get("scale_factor")
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else 1.0


def convert_ldm_kl(src: Path, overrides: Sequence[str]) -> Converted:
    """A kl run of an LDM / Stable Diffusion AutoencoderKL in the original layout (.ckpt / .pt / .safetensors)."""
    full, entry = read_state_dict(src, ENTRIES)
    state, record = select(full, TRAINING_ONLY)
    aligned = sorted(k for k in state if k.startswith(VF_ALIGNMENT))
    if aligned:
        raise ConversionError(f"{src} has tensors no LDM KL autoencoder has: {listing(aligned)} (VA-VAE's alignment "
                              "to DINOv2): use `twostage convert vavae`")
    model = {"encode_posterior": "sample", "scaling_factor": _scale_factor(full)}
    return build(state, src, overrides, "LDM KL autoencoder", model,
                 {"peer": LDM_PEER, "entry": entry, **record})


def convert_vavae(src: Path, overrides: Sequence[str]) -> Converted:
    """A kl run of VA-VAE (vavae-imagenet256-f16d32-dinov2.pt): the LDM layout under "state_dict", with its
    alignment tensors dropped."""
    state, entry = read_state_dict(src, ENTRIES)
    state, record = select(state, TRAINING_ONLY + VF_ALIGNMENT)
    return build(state, src, overrides, "VA-VAE (LDM KL autoencoder)", {"encode_posterior": "sample"},
                 {"peer": VAVAE_PEER, "entry": entry, **record})


def diffusers_config(src: Path) -> tuple[dict, str | None]:
    """(diffusers' AutoencoderKL config, the config.json it came from or None) for weights file `src`:
    diffusers saves config.json next to diffusion_pytorch_model.safetensors."""
    path = src.parent / "config.json"
    if not path.is_file():
        return dict(DIFFUSERS_DEFAULTS), None
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ConversionError(f"{path} (the diffusers config next to {src.name}) is not JSON: {err}") from None
    kind = config.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise ConversionError(f"{path} describes a diffusers {kind}, not an AutoencoderKL")
    if config.get("act_fn", "silu") != "silu":
        raise ConversionError(f"{path}: act_fn={config['act_fn']!r}; twostage's kl model uses silu")
    return {**DIFFUSERS_DEFAULTS, **config}, str(path)


def convert_diffusers_kl(src: Path, overrides: Sequence[str]) -> Converted:
    """A kl run of a diffusers AutoencoderKL (diffusion_pytorch_model.safetensors / .bin; its config.json beside)."""
    state, entry = read_state_dict(src, ENTRIES)
    config, config_path = diffusers_config(src)
    model = {"norm_groups": config["norm_num_groups"], "scaling_factor": config["scaling_factor"],
             "shift_factor": config["shift_factor"] or 0.0, "encode_posterior": "sample"}
    record = {"peer": DIFFUSERS_PEER, "entry": entry, "config": config_path}
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        # Per-channel latent statistics: what twostage's DiT computes from its cache (docs/methods.md (7.1)).
        record["not_applied"] = "latents_mean / latents_std (per-channel normalization: the DiT's cache statistics)"
    return build(ldm_state(state, src), src, overrides, "diffusers AutoencoderKL", model, record)


__all__ = ["peer_keys", "ldm_name", "ldm_state", "select", "architecture", "mapped_state", "convert_ldm_kl",
           "convert_vavae", "convert_diffusers_kl", "diffusers_config"]
