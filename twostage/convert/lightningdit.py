"""LightningDiT's class-conditional flow transformers (B / L / XL, 1.0B, 1.6B) as twostage `dit` generator runs.

Peer: hustvl/LightningDiT, models/lightningdit.py (class LightningDiT) and its sampler transport/ (Euler on
a shifted grid through torchdiffeq); the conversion is checked against that code's outputs by
tests/test_convert_lightningdit.py (golden file made by scripts/golden/lightningdit.py). The published
weights (lightningdit-xl-imagenet256-{64,800}ep.pt) are torch files of train.py's checkpoint
{"model", "ema", "opt", "config"}; inference.py samples from "ema", and so does this converter ("model" or a
plain state dict otherwise; DDP's "module." and torch.compile's "_orig_mod." prefixes are taken off).

twostage's DiT (twostage/generators/dit/model.py) is the same network: patch embedding + fixed 2D sin-cos
table, AdaLN blocks with RMSNorm (eps 1e-6), fused-qkv attention with biases, 2D RoPE and optional
QK-norm, SwiGLU with biases, AdaLN final layer, label table with a null row. What differs, and how the
conversion makes the converted model compute what LightningDiT computes (docs/methods.md §7):

- time: LightningDiT feeds t in [0, 1] itself to the 256 sinusoids, twostage 1000 t: the run sets
  `model.time_scale: 1.0`. The time convention is the same (t = 0 noise, t = 1 data, v = x_1 - eps).
- position table: LightningDiT's halves are [column | row] (its meshgrid's first axis is the column):
  `model.pos_order: col_row`. The checkpoint's `pos_embed` is checked against it.
- norm gains: LightningDiT's RMSNorms (norm1, norm2, norm_final) have learned gains g; twostage's have none.
  RMS(x) g (1 + scale) + shift = RMS(x) (1 + scale') + shift with scale' = g scale + g - 1, so each gain is
  folded into the AdaLN layer that makes that scale: its rows W' = diag(g) W, bias b' = g b + g - 1.
  (QK-norm gains map to twostage's QK-norm gains.)
- RoPE pairing: LightningDiT (EVA's rotate_half) rotates dims (2j, 2j+1) of each axis half together,
  twostage dims j and j + F; same axes (rows first), same frequencies. The query and key rows of qkv (and
  their biases and QK-norm gains) are reordered within each head, as for LlamaGen (llamagen_gpt.qk_row_order).
- output patch layout: LightningDiT's output channels are (p, q, c), twostage's (c, p, q): the rows of the
  final linear layer are reordered. The input conv's weight (width, c, p, q) is twostage's linear as it is.
- SwiGLU hidden: LightningDiT's int(2/3 * 4 w), not rounded (2730 at width 1024, 4778 at 1792):
  `model.ffn_multiple_of: 1` where that differs from twostage's rounding to 8.
- AdaLN without shift (LightningDiT's `wo_shift`): zero shift rows are inserted.
- names: x_embedder.proj / t_embedder.mlp / y_embedder.embedding_table / blocks.<i>.adaLN_modulation.1 /
  .attn.qkv, .proj, .q_norm, .k_norm / .mlp.w12, .w3 / final_layer.adaLN_modulation.1, .linear are
  patch_embed / t_embed.mlp / y_embed / blocks.<i>.ada / .attn.* / .mlp.gate_up, .down / final_ada, final.
- what shapes say: width, latent channels and patch size (x_embedder), layers, FFN hidden, QK-norm, shift,
  classes (label rows less the null row), the head width (from the RoPE table, a stored buffer). Heads
  without RoPE: LightningDiT's table by (layers, width), or `model.heads=N`. The latent grid is the
  tokenizer run's, checked against the checkpoint's position table.
- refused: LayerNorm blocks (use_rmsnorm false), the GELU MLP (use_swiglu false), learn_sigma.
- dropped: the fixed buffers pos_embed and feat_rope.freqs_cos / freqs_sin (recomputed by twostage).

Sampling: LightningDiT's `num_sampling_steps: N` is torchdiffeq's Euler on linspace(0, 1, N) shifted,
i.e. N - 1 steps; twostage's `sample.steps` counts steps, so the run's sample section holds its
configuration's 250 as 249 steps, timestep shift 0.3, guidance from t = 0.11 on. Guidance itself differs:
LightningDiT guides the first 3 latent channels only, twostage all of them (docs/methods.md (7.7)), so its
CFG scales (6.7, 10) do not carry over; the run keeps cfg_scale 1 and `sample.*` overrides set it.

Latent statistics: LightningDiT trains on (z - mean) / std with the channel-wise statistics of its
latents_stats.pt (published beside the VA-VAE); `--latent-stats FILE` gives that file (a torch file
{"mean", "std"} of shape (1, C, 1, 1), or a .safetensors with the same two tensors), recorded in model.json
as a trained run records its cache's statistics. Its latent_multiplier must be 1 (the published setting).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from twostage import config as configlib
from twostage.config import parse_overrides
from twostage.convert import ConversionError
from twostage.convert.llamagen_gpt import qk_row_order
from twostage.convert.run_folder import Converted, tokenizer_cache_meta
from twostage.convert.source import gather_state, listing, read_state_dict
from twostage.generators.dit.config import DIT_SHAPES, DiTRunConfig
from twostage.generators.dit.model import LightningDiT, ffn_hidden, sincos_2d
from twostage.generators.dit.run import KIND, TIME_CONVENTION
from twostage.generators.dit.task import MODULE
from twostage.generators.runs import model_record

PEER = "hustvl/LightningDiT models/lightningdit.py"
ENTRIES = ("ema", "model", "state_dict")  # inference.py samples from "ema"
PREFIXES = ("module.", "_orig_mod.")  # DDP's, torch.compile's
FIXED = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")  # buffers, recomputed here
ANCHORS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
           "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight", "pos_embed")
# LightningDiT's model table (models/lightningdit.py LightningDiT_models): (layers, width) -> heads.
LIGHTNINGDIT_HEADS = {(12, 768): 12, (24, 1024): 16, (28, 1152): 16, (24, 1536): 24, (28, 1792): 28}
# configs/lightningdit_xl_vavae_f16d32.yaml's sampling: num_sampling_steps 250 (= 249 Euler steps),
# timestep_shift 0.3, cfg_interval_start 0.11; cfg_scale stays 1 (its scales guide 3 channels only).
SAMPLE = {"sampler": "euler", "steps": 249, "shift": 0.3, "cfg_scale": 1.0, "cfg_interval_start": 0.11,
          "cfg_interval_end": 1.0}

# A twostage key -> its LightningDiT name, substitutions applied in order (the AdaLN rows are assembled
# separately: they carry the norm gains).
RENAMES = (
    (r"^patch_embed\.", "x_embedder.proj."),
    (r"^t_embed\.", "t_embedder."),
    (r"^y_embed\.weight$", "y_embedder.embedding_table.weight"),
    (r"^blocks\.(\d+)\.mlp\.gate_up\.", r"blocks.\1.mlp.w12."),
    (r"^blocks\.(\d+)\.mlp\.down\.", r"blocks.\1.mlp.w3."),
    (r"^final\.", "final_layer.linear."),
)


def peer_key(key: str) -> str:
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def peer_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state without DDP's / torch.compile's prefixes, the prefixes taken off)."""
    removed = []
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            removed.append(prefix)
    return state, removed


def architecture(state: dict[str, torch.Tensor], src: Path, heads: int | None) -> dict:
    """The `model` section (DiTModelConfig fields) and what else the weights say of the network."""
    missing = [k for k in ANCHORS if k not in state]
    if missing:
        found = f"{len(state)} tensor{'' if len(state) == 1 else 's'}, e.g. {listing(sorted(state), 3) or 'none'}"
        raise ConversionError(f"{src} is not a LightningDiT state dict: it has no {listing(missing)} ({found})")
    width, channels, patch, patch_w = state["x_embedder.proj.weight"].shape
    if patch != patch_w or patch not in (1, 2, 4):
        raise ConversionError(f"{src}: patch {patch}x{patch_w}; twostage's DiT takes square patches of 1, 2 or 4")
    layers = 0
    while f"blocks.{layers}.adaLN_modulation.1.weight" in state:
        layers += 1
    if "blocks.0.norm1.weight" not in state:
        raise ConversionError(f"{src}: its blocks have no norm1.weight, i.e. LayerNorm blocks (use_rmsnorm: false); "
                              "twostage's DiT has RMSNorm blocks only, as the published LightningDiT models")
    if "blocks.0.mlp.w12.weight" not in state:
        raise ConversionError(f"{src}: its blocks have no mlp.w12 (a GELU MLP, use_swiglu: false); twostage's DiT "
                              "has a SwiGLU feed-forward only, as the published LightningDiT models")
    out_rows = state["final_layer.linear.weight"].shape[0]
    if out_rows != patch * patch * channels:
        raise ConversionError(f"{src}: its output layer has {out_rows} rows for {channels} channels and patch "
                              f"{patch}: a learn_sigma model (2x channels), which twostage's flow DiT does not have")
    ada_rows = state["blocks.0.adaLN_modulation.1.weight"].shape[0]
    if ada_rows not in (4 * width, 6 * width):
        raise ConversionError(f"{src}: adaLN_modulation has {ada_rows} rows for width {width}, not 6 or 4 x {width}")
    rope = "feat_rope.freqs_cos" in state
    if rope:
        head_dim = state["feat_rope.freqs_cos"].shape[-1]
        found = width // head_dim
        if heads is not None and heads != found:
            raise ConversionError(f"{src}: model.heads={heads}, but its RoPE table is for heads of width {head_dim}, "
                                  f"i.e. {found} heads; leave model.heads out")
        heads = found
    elif heads is None:
        heads = LIGHTNINGDIT_HEADS.get((layers, width))
        if heads is None:
            raise ConversionError(f"{src}: {layers} blocks of width {width} is not one of LightningDiT's shapes, and "
                                  "without RoPE the number of heads is not in the weights; give it as model.heads=N")
    if width % heads or (rope and (width // heads) % 4):
        raise ConversionError(f"{src}: width {width} with {heads} heads: the head width must be a whole multiple "
                              f"of {4 if rope else 1}")
    hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2
    multiple = next((m for m in (8, 1) if ffn_hidden(width, 4.0, m) == hidden), None)
    if multiple is None:
        raise ConversionError(f"{src}: SwiGLU hidden size {hidden} at width {width} is not LightningDiT's "
                              f"int(2/3 * 4 * {width}) = {ffn_hidden(width, 4.0, 1)} (another mlp_ratio?)")
    shape = (layers, width, heads)
    size = next((name for name, s in DIT_SHAPES.items() if s == shape), None)
    model = {"size": size} if size else {"size": "B", "layers": layers, "width": width, "heads": heads}
    model.update({"patch_size": patch, "qk_norm": "blocks.0.attn.q_norm.weight" in state, "rope": rope,
                  "abs_pos": True, "norm_eps": 1e-6, "rope_base": 10000.0, "mlp_ratio": 4.0})
    # the options that make it LightningDiT's network; ffn_multiple_of only where the rounding differs
    model.update({"time_scale": 1.0, "pos_order": "col_row", **({"ffn_multiple_of": 1} if multiple == 1 else {})})
    return {"model": model, "channels": channels, "shift": ada_rows == 6 * width,
            "num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1,
            "tokens": state["pos_embed"].shape[-2]}


def fold_ada(weight: torch.Tensor, bias: torch.Tensor, gains: dict[int, torch.Tensor], chunks: int,
             shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LightningDiT's AdaLN rows (chunks of width rows each; without shift: only scale / gate chunks) as
    twostage's [shift, scale, gate]* rows, each norm gain folded into the scale chunk it multiplies:
    `gains` maps a twostage chunk index (of a scale) to the gain g; W' = diag(g) W, b' = g b + g - 1."""
    width = weight.shape[1]
    w, b = list(weight.double().split(width)), list(bias.double().split(width))
    if not shift:  # wo_shift: [scale, gate]* -> [0, scale, gate]*
        zero_w, zero_b = torch.zeros_like(w[0]), torch.zeros_like(b[0])
        w = [part for i in range(0, len(w), 2) for part in (zero_w, w[i], w[i + 1])]
        b = [part for i in range(0, len(b), 2) for part in (zero_b, b[i], b[i + 1])]
    if len(w) != chunks:
        raise ConversionError(f"AdaLN layer of {len(w)} chunks, expected {chunks}")
    for i, g in gains.items():
        g = g.double()
        w[i] = g[:, None] * w[i]
        b[i] = g * b[i] + g - 1.0
    return torch.cat(w).to(weight.dtype), torch.cat(b).to(bias.dtype)


def output_row_order(channels: int, patch: int) -> torch.Tensor:
    """order such that twostage's output row (c, p, q) is LightningDiT's row order[.] of layout (p, q, c)."""
    c, p, q = torch.meshgrid(torch.arange(channels), torch.arange(patch), torch.arange(patch), indexing="ij")
    return ((p * patch + q) * channels + c).flatten()


def permute_qk_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv weight (3 w, w) or bias (3 w,) with its query and key rows in twostage's RoPE order."""
    width = t.shape[0] // 3
    x = t.reshape(3, heads, width // heads, *t.shape[1:]).clone()
    x[:2] = x[:2, :, qk_row_order(width // heads)]
    return x.reshape(t.shape)


def mapped_state(model: LightningDiT, state: dict[str, torch.Tensor], src: Path,
                 shift: bool) -> dict[str, torch.Tensor]:
    """`model`'s state dict filled from the LightningDiT tensors; every tensor of `state` used."""
    ours = model.state_dict()
    heads, rope = model.cfg.shape[2], model.cfg.rope
    ada = re.compile(r"^blocks\.(\d+)\.ada\.(weight|bias)$")
    plain = {k: [peer_key(k)] for k in ours if not ada.match(k) and not k.startswith("final_ada.")}
    # The AdaLN layers are checked and assembled here; their norm gains are "used" through them.
    folded = {}
    for key in ours:
        m = ada.match(key)
        if m is None:
            continue
        i = m.group(1)
        folded[key] = (f"blocks.{i}.adaLN_modulation.1.{m.group(2)}",
                       {1: f"blocks.{i}.norm1.weight", 4: f"blocks.{i}.norm2.weight"}, 6)
    for part in ("weight", "bias"):
        folded[f"final_ada.{part}"] = (f"final_layer.adaLN_modulation.1.{part}", {1: "final_layer.norm_final.weight"}, 2)
    names = [name for source, gains, _ in folded.values() for name in (source, *gains.values())]
    width = model.width
    state = dict(state)
    conv = state.get("x_embedder.proj.weight")
    if conv is not None and conv.ndim == 4:  # the conv (width, c, p, q) is our linear over (c, p, q) patches
        state["x_embedder.proj.weight"] = conv.reshape(conv.shape[0], -1)
    # gather_state's checks (every peer tensor used, none missing, shapes) over the plain tensors, with
    # the AdaLN tensors and gains named as "ignored" there and checked below
    out = gather_state(ours, plain, state, src, "LightningDiT of this shape", ignored=[*FIXED, *names])
    absent = sorted({n for n in names if n not in state})
    if absent:
        raise ConversionError(f"{src} does not match the LightningDiT of this shape: it lacks {listing(absent)}")
    for key, (source, gains, chunks) in folded.items():
        if not key.endswith(".weight"):
            continue
        bias_key, bias_source = key[: -len("weight")] + "bias", source[: -len("weight")] + "bias"
        weight, bias = state[source], state[bias_source]
        rows = (chunks if shift or chunks == 2 else chunks * 2 // 3) * width
        if tuple(weight.shape) != (rows, width) or tuple(bias.shape) != (rows,):
            raise ConversionError(f"{src}: {source} has shape {tuple(weight.shape)}; the architecture read from the "
                                  f"other tensors needs {(rows, width)}")
        for name in gains.values():
            if tuple(state[name].shape) != (width,):
                raise ConversionError(f"{src}: {name} has shape {tuple(state[name].shape)}, not ({width},)")
        out[key], out[bias_key] = fold_ada(weight, bias, {i: state[n] for i, n in gains.items()}, chunks,
                                           shift or chunks == 2)
    order = output_row_order(model.in_channels, model.patch)
    out["final.weight"], out["final.bias"] = state["final_layer.linear.weight"][order], state["final_layer.linear.bias"][order]
    if rope:
        head_order = qk_row_order(width // heads)
        for key in list(out):
            if key.endswith(".attn.qkv.weight") or key.endswith(".attn.qkv.bias"):
                out[key] = permute_qk_rows(out[key], heads)
            elif key.endswith(".attn.q_norm.weight") or key.endswith(".attn.k_norm.weight"):
                out[key] = out[key][head_order]
    return out


def check_positions(state: dict[str, torch.Tensor], model: LightningDiT, src: Path) -> None:
    """The checkpoint's fixed position table is the [column | row] sin-cos table of the run's token grid."""
    table = state["pos_embed"].reshape(-1, model.width).double()
    ours = sincos_2d(model.tokens_grid, model.width, "col_row").double()
    if table.shape != ours.shape or (table - ours).abs().max() > 1e-5:
        raise ConversionError(f"{src}: its pos_embed is not LightningDiT's sin-cos table of a {model.tokens_grid[0]}x"
                              f"{model.tokens_grid[1]} token grid (the tokenizer's latent grid over patch "
                              f"{model.patch}); give the tokenizer run and image size the model was trained with")


def read_latent_stats(path: Path, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) per channel from LightningDiT's latents_stats.pt ({"mean", "std"}, (1, C, 1, 1) each)."""
    if not path.is_file():
        raise FileNotFoundError(f"--latent-stats {path} is not a file (LightningDiT's latents_stats.pt, published "
                                "beside the VA-VAE: https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2)")
    stats, _ = read_state_dict(path, ())
    if set(stats) != {"mean", "std"}:
        raise ConversionError(f"--latent-stats {path} holds {listing(sorted(stats))}, not LightningDiT's "
                              "{'mean', 'std'}")
    out = []
    for name in ("mean", "std"):
        t = stats[name].double().flatten()
        if t.numel() != channels:
            raise ConversionError(f"--latent-stats {path}: {name} has {t.numel()} values for a model of {channels} "
                                  "latent channels (channel-wise statistics, shape (1, C, 1, 1))")
        out.append(t.tolist())
    if min(out[1]) <= 0:
        raise ConversionError(f"--latent-stats {path}: std has a value <= 0")
    return out[0], out[1]


def convert_lightningdit(src: Path, overrides: Sequence[str], tokenizer: Path, latent_stats: Path) -> Converted:
    """A dit generator run config, model and model.json holding the LightningDiT weights in `src`."""
    if not Path(latent_stats).is_file():  # before reading a checkpoint of gigabytes
        read_latent_stats(Path(latent_stats), 0)
    raw, entry = read_state_dict(src, ENTRIES)
    state, prefixes = peer_state(raw)
    heads = parse_overrides(list(overrides)).get("model", {}).get("heads")
    arch = architecture(state, src, heads)
    cfg = configlib.load(DiTRunConfig, {"kind": KIND, "model": arch["model"], "sample": SAMPLE}, list(overrides))
    meta = tokenizer_cache_meta(tokenizer, "latents", arch["channels"], arch["num_classes"], src,
                                expects=f"models latents of {arch['channels']} channels",
                                fix="give the KL run the DiT was trained on (e.g. `twostage convert vavae`)")
    mean, std = read_latent_stats(Path(latent_stats), arch["channels"])
    p = cfg.model.patch_size
    if meta.grid[0] % p or meta.grid[1] % p or (meta.grid[0] // p) * (meta.grid[1] // p) != arch["tokens"]:
        raise ConversionError(f"{src} has {arch['tokens']} tokens (its pos_embed) but the tokenizer run's "
                              f"{meta.grid[0]}x{meta.grid[1]} latents make {(meta.grid[0] // p) * (meta.grid[1] // p)} "
                              f"of patch {p}: give the tokenizer run (or data.image_size) it was trained at")
    model = LightningDiT(cfg.model, arch["channels"], meta.grid, arch["num_classes"])
    check_positions(state, model, src)
    model.load_state_dict(mapped_state(model, state, src, arch["shift"]), strict=True)
    record = model_record(KIND, model, meta, batch_size=cfg.train.batch_size, train_cache=tokenizer,
                          val_cache=None, train_samples=0)
    record.update({"train_cache": None, "train_samples": None,  # not trained here
                   "latent_mean": mean, "latent_std": std, "time_convention": TIME_CONVENTION})
    source = {"peer": PEER, "entry": entry, "prefixes": prefixes, "dropped": [k for k in FIXED if k in state],
              "latent_stats": str(Path(latent_stats).resolve())}
    return Converted(config=cfg, modules={MODULE: model}, converted_from=source, model_json=record)


__all__ = ["PEER", "SAMPLE", "architecture", "fold_ada", "output_row_order", "mapped_state", "read_latent_stats",
           "convert_lightningdit"]
