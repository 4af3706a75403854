"""LlamaGen's VQ image tokenizers (VQ-16, VQ-8) as twostage `vq` tokenizer runs.

Peer: FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py (VQModel, Encoder, Decoder,
VectorQuantizer; VQ_16 has channel multipliers (1, 1, 2, 2, 4), VQ_8 (1, 2, 2, 4)); the conversion is
checked against that file's outputs by tests/test_convert_llamagen_vq.py (golden files made by
scripts/golden/llamagen_vq.py). The published weights (vq_ds16_c2i.pt, vq_ds8_c2i.pt) are torch files
with the state dict under "model", the entry LlamaGen's own sampling and code extraction load
(autoregressive/sample/sample_c2i.py), so that entry is preferred to "ema".

twostage's VQ model is the same network (twostage/tokenizers/conv.py, twostage/tokenizers/vq/), so no
architecture option is added for it; the conversion renames keys and handles these differences:

- attention: LlamaGen has separate 1x1 q, k, v convs; twostage one fused qkv conv whose output channels
  are queries, keys, values in that order (conv.AttnBlock), so the three weights and biases are
  concatenated along the output channels. `proj_out` is `proj`.
- layout: `conv_blocks.<i>.res / .attn / .downsample / .upsample` are `levels.<i>.blocks / .attns /
  .resample` (the decoder's levels in the same order, lowest resolution first); `nin_shortcut` is
  `shortcut`; the middle `mid.0 / 1 / 2` is `mid.res1 / attn / res2`; `quantize` is `quantizer`.
- `quantize.codebook_used`, a buffer of recent training codes for LlamaGen's usage display, is dropped.
- the architecture is read off tensor shapes: base channels, channel multipliers, res blocks per level
  (2 in the encoder, 3 in the decoder for VQ-16 / VQ-8), z channels, code dimension, codebook size.
  What shapes do not say is fixed by LlamaGen's code and set explicitly here: GroupNorm with 32 groups
  and eps 1e-6 (`Normalize`), one attention head scaled by C^-1/2 after every res block of the
  lowest-resolution level and in the middle, the nearest-code search on l2-normalized latents and codes
  with the normalized code passed on (`ModelArgs.codebook_l2_norm`, True for VQ_16 / VQ_8), dropout 0.
- LlamaGen allows different encoder and decoder channel multipliers; twostage has one `channel_mult`,
  so a checkpoint whose two differ is refused (the published ones have the same).

The published tokenizers were trained on ImageNet at 256x256, so the run's data section defaults to
image_size 256 with resize_crop; `data.*` overrides name the data `encode` and `eval recon` read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from twostage import config as configlib
from twostage.convert import ConversionError
from twostage.convert.run_folder import Converted
from twostage.convert.source import channel_mult, gather_state, listing, read_state_dict, split_fused_qkv
from twostage.tokenizers.base import MODULE
from twostage.tokenizers.vq.config import VQRunConfig
from twostage.tokenizers.vq.model import VQModel

PEER = "FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py"
ENTRIES = ("model", "ema", "state_dict")  # where a training checkpoint may hold the weights, preferred first
DROPPED = ("quantize.codebook_used",)
# Keys every LlamaGen VQ state dict has; without them the file is some other model's.
ANCHORS = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "quantize.embedding.weight",
           "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
DATA = {"image_size": 256, "resize": "resize_crop"}

# A twostage key -> its LlamaGen name, substitutions applied in order.
RENAMES = (
    (r"^(encoder|decoder)\.levels\.(\d+)\.blocks\.", r"\1.conv_blocks.\2.res."),
    (r"^(encoder|decoder)\.levels\.(\d+)\.attns\.", r"\1.conv_blocks.\2.attn."),
    (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.conv_blocks.\1.downsample."),
    (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.conv_blocks.\1.upsample."),
    (r"\.mid\.res1\.", ".mid.0."),
    (r"\.mid\.attn\.", ".mid.1."),
    (r"\.mid\.res2\.", ".mid.2."),
    (r"\.shortcut\.", ".nin_shortcut."),
    (r"\.proj\.", ".proj_out."),
    (r"^quantizer\.", "quantize."),
)


def peer_keys(key: str) -> list[str]:
    """The LlamaGen key(s) a twostage key is made of: q, k, v for the fused attention conv, else one."""
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    return split_fused_qkv(key)


def _level_widths(state: dict[str, torch.Tensor], side: str) -> list[int]:
    """Output channels of the first res block of each level of the encoder or decoder, in key order."""
    widths = []
    while (key := f"{side}.conv_blocks.{len(widths)}.res.0.conv1.weight") in state:
        widths.append(state[key].shape[0])
    return widths


def _res_blocks(state: dict[str, torch.Tensor], side: str) -> int:
    count = 0
    while f"{side}.conv_blocks.0.res.{count}.conv1.weight" in state:
        count += 1
    return count


def architecture(state: dict[str, torch.Tensor], src: Path) -> dict:
    """The `model` section (VQConfig fields) of the LlamaGen VQ model whose weights `state` holds."""
    missing = [k for k in ANCHORS if k not in state]
    if missing:
        found = f"{len(state)} tensor{'' if len(state) == 1 else 's'}, e.g. {listing(sorted(state), 3) or 'none'}"
        raise ConversionError(f"{src} is not a LlamaGen VQ tokenizer state dict: it has no {listing(missing)} "
                              f"({found})")
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    encoder, decoder = _level_widths(state, "encoder"), _level_widths(state, "decoder")[::-1]
    if not encoder or not decoder:
        side = "encoder" if not encoder else "decoder"
        raise ConversionError(f"{src} is not a LlamaGen VQ tokenizer state dict: it has no "
                              f"{side}.conv_blocks.0.res.0.conv1.weight")
    mult = channel_mult(encoder, decoder, base, src, "vq")
    codebook = state["quantize.embedding.weight"]
    return {
        "in_channels": in_channels, "out_channels": state["decoder.conv_out.weight"].shape[0],
        "base_channels": base, "channel_mult": mult,
        "enc_res_blocks": _res_blocks(state, "encoder"), "dec_res_blocks": _res_blocks(state, "decoder"),
        "z_channels": state["encoder.conv_out.weight"].shape[0], "norm_groups": 32, "attn_heads": 1,
        "mid_attn": True, "dropout": 0.0, "codebook_size": codebook.shape[0], "code_dim": codebook.shape[1],
        "l2_norm": True,
    }


def mapped_state(model: VQModel, state: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """`model`'s state dict filled from the LlamaGen tensors; every tensor of `state` used or in DROPPED."""
    ours = model.state_dict()
    return gather_state(ours, {key: peer_keys(key) for key in ours}, state, src, "LlamaGen VQ model", DROPPED)


def convert_llamagen_vq(src: Path, overrides: Sequence[str]) -> Converted:
    """A vq tokenizer run config and model holding the LlamaGen VQ weights in `src` (.pt or .safetensors)."""
    state, entry = read_state_dict(src, ENTRIES)
    source = {"kind": "vq", "model": architecture(state, src), "data": DATA}
    cfg = configlib.load(VQRunConfig, source, list(overrides))
    model = VQModel(cfg.model)
    model.load_state_dict(mapped_state(model, state, src), strict=True)
    record = {"peer": PEER, "entry": entry, "dropped": [k for k in DROPPED if k in state]}
    return Converted(config=cfg, modules={MODULE: model}, converted_from=record)


__all__ = ["PEER", "peer_keys", "architecture", "mapped_state", "convert_llamagen_vq"]
