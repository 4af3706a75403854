"""LlamaGen's class-conditional GPT (GPT-B ... GPT-XXXL, c2i_*.pt) as twostage `ar` generator runs.

Peer: FoundationVision/LlamaGen, autoregressive/models/gpt.py (Transformer with model_type "c2i"); the
conversion is checked against that file's outputs by tests/test_convert_llamagen_gpt.py (golden file
made by scripts/golden/llamagen_gpt.py). The published weights are torch files with the state dict
under "model" (LlamaGen's autoregressive/sample/sample_c2i.py also accepts "module" and "state_dict";
so does this converter), possibly with the "_orig_mod." prefix torch.compile puts on every key.

twostage's AR transformer (twostage/generators/ar/model.py) is the same network: pre-norm RMSNorm
blocks (eps 1e-5), fused-qkv attention, SwiGLU with hidden round_up(8 * width / 3, 256), a label table
with the null class as its last row, a bias-free head, one class token in front. What differs, and how
the conversion handles it:

- RoPE of the class token: LlamaGen's table has zero rows for it (cos = sin = 0), so that token's
  queries and keys are zero in every layer; twostage gives it the identity rotation. The run sets
  `model.prefix_rope: zero`, twostage's option for LlamaGen's table.
- RoPE pairing: LlamaGen rotates dims (2p, 2p+1) of a head together, pairs 0..F-1 by the token's row and
  F..2F-1 by its column (F = head width / 4); twostage rotates dim j with j + F within a row half
  [0, 2F) and a column half [2F, 4F) (twostage/nn/rope.py), same frequencies. The query and key rows
  of `wqkv` are reordered within each head (`qk_row_order`) so that each of LlamaGen's pairs lands on
  the twostage pair of the same axis and frequency; values are not rotated and keep their order.
- feed-forward: LlamaGen's silu(w1 x) * w3 x, down by w2; twostage's fused `gate_up` is [gate; up]
  (twostage.nn.layers.SwiGLU chunks it in that order), so it is w1 and w3 concatenated, `down` is w2.
- names: tok_embeddings / cls_embedding.embedding_table / layers.<i>.attention.wqkv, .wo /
  attention_norm / feed_forward / ffn_norm / norm / output are tok_emb / cls_emb / blocks.<i>.attn.qkv,
  .proj / attn_norm / ffn / ffn_norm / norm / head.
- what shapes say: vocabulary and width (tok_embeddings), layers, FFN hidden size, classes (label rows
  less the null row). What they do not: the number of heads, taken from LlamaGen's GPT table by
  (layers, width), or `model.heads=N` for another shape. The grid (LlamaGen's block_size) is the
  tokenizer run's: its image size over its downsampling factor (16x16 for VQ-16 at 256 pixels).
- refused: grouped-query attention (n_kv_head < n_head; no published c2i model has it), text-conditional
  models (a caption embedder instead of a label table), a FFN smaller than Llama's 8/3 rule.
- dropped: `freqs_cis` and KV-cache buffers, which some checkpoints carry (not weights).

Sampling already matches (CFG formula and null class, then temperature -> top-k -> top-p); twostage's
`sample.cfg_until = k` guides the steps LlamaGen's `--cfg-interval k - 2` guides. The run's sample section
holds sample_c2i.py's defaults (cfg 4.0, top-k 2000, temperature 1, top-p 1, guidance at every step);
`sample.*` overrides change them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from twostage import config as configlib
from twostage.config import parse_overrides
from twostage.convert import ConversionError
from twostage.convert.run_folder import Converted, tokenizer_cache_meta
from twostage.convert.source import gather_state, listing, read_state_dict
from twostage.generators.ar.config import AR_SHAPES, ARRunConfig
from twostage.generators.ar.model import ARTransformer
from twostage.generators.ar.run import KIND
from twostage.generators.ar.task import MODULE
from twostage.generators.runs import model_record

PEER = "FoundationVision/LlamaGen autoregressive/models/gpt.py"
ENTRIES = ("model", "module", "state_dict")  # sample_c2i.py's order
COMPILED = "_orig_mod."  # torch.compile's key prefix
DROPPED = (re.compile(r"^freqs_cis$"), re.compile(r"\.kv_cache\.[kv]_cache$"))
ANCHORS = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight",
           "layers.0.feed_forward.w1.weight", "norm.weight", "output.weight")
# LlamaGen's class-conditional GPT table (gpt.py GPT_models): (layers, width) -> heads.
LLAMAGEN_HEADS = {(12, 768): 12, (24, 1024): 16, (36, 1280): 20, (48, 1536): 24, (48, 2560): 40}
FFN_MULTIPLE = 256  # LlamaGen's multiple_of
# sample_c2i.py's defaults (its cfg_interval -1: guidance at every step).
SAMPLE = {"cfg_scale": 4.0, "top_k": 2000, "temperature": 1.0, "top_p": 1.0, "cfg_until": None}

# A twostage key -> its LlamaGen name, substitutions applied in order.
RENAMES = (
    (r"^tok_emb\.", "tok_embeddings."),
    (r"^cls_emb\.", "cls_embedding.embedding_table."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"layers.\1.attention.wqkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.wo."),
    (r"^blocks\.(\d+)\.attn_norm\.", r"layers.\1.attention_norm."),
    (r"^blocks\.(\d+)\.ffn_norm\.", r"layers.\1.ffn_norm."),
    (r"^blocks\.(\d+)\.ffn\.down\.", r"layers.\1.feed_forward.w2."),
    (r"^head\.", "output."),
)
GATE_UP = re.compile(r"^blocks\.(\d+)\.ffn\.gate_up\.weight$")


def peer_keys(key: str) -> list[str]:
    """The LlamaGen key(s) a twostage key is made of: w1 and w3 for the fused gate_up, else one."""
    fused = GATE_UP.match(key)
    if fused:
        return [f"layers.{fused.group(1)}.feed_forward.{w}.weight" for w in ("w1", "w3")]
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    return [key]


def qk_row_order(head_dim: int) -> torch.Tensor:
    """order (head_dim,) such that twostage's query / key row t of a head is LlamaGen's row order[t].

    twostage dim (half a, member m, frequency j) = a*2F + m*F + j; LlamaGen's is 2*(a*F + j) + m."""
    f = head_dim // 4
    axis, member, freq = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(f), indexing="ij")
    return (2 * (axis * f + freq) + member).flatten()


def permute_qk(wqkv: torch.Tensor, heads: int) -> torch.Tensor:
    """LlamaGen's wqkv (3 * width, width) with its query and key rows in twostage's RoPE order."""
    width = wqkv.shape[1]
    w = wqkv.reshape(3, heads, width // heads, width).clone()
    order = qk_row_order(width // heads)
    w[:2] = w[:2, :, order]
    return w.reshape(3 * width, width)


def peer_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state without torch.compile's prefix and without the non-weights, the dropped keys)."""
    state = {k[len(COMPILED):] if k.startswith(COMPILED) else k: v for k, v in state.items()}
    dropped = sorted(k for k in state if any(p.search(k) for p in DROPPED))
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def architecture(state: dict[str, torch.Tensor], src: Path, heads: int | None) -> dict:
    """The `model` section (ARModelConfig fields) and the vocab / classes of the GPT in `state`."""
    missing = [k for k in ANCHORS if k not in state]
    if missing:
        found = f"{len(state)} tensor{'' if len(state) == 1 else 's'}, e.g. {listing(sorted(state), 3) or 'none'}"
        hint = " (a text-conditional model?)" if any(k.startswith("cls_embedding.cap_proj") for k in state) else ""
        raise ConversionError(f"{src} is not a LlamaGen class-conditional GPT state dict{hint}: it has no "
                              f"{listing(missing)} ({found})")
    vocab, width = state["tok_embeddings.weight"].shape
    layers = 0
    while f"layers.{layers}.attention.wqkv.weight" in state:
        layers += 1
    qkv_rows = state["layers.0.attention.wqkv.weight"].shape[0]
    if qkv_rows != 3 * width:
        raise ConversionError(f"{src}: wqkv has {qkv_rows} rows for width {width}, not 3 x {width}: grouped-query "
                              "attention (n_kv_head < n_head), which twostage's AR model does not have")
    if heads is None:
        heads = LLAMAGEN_HEADS.get((layers, width))
        if heads is None:
            raise ConversionError(f"{src}: {layers} layers of width {width} is not one of LlamaGen's GPT shapes, and "
                                  "the number of heads is not in the weights; give it as model.heads=N")
    if width % heads or (width // heads) % 4:
        raise ConversionError(f"{src}: width {width} with {heads} heads: the head width must be a whole multiple of 4")
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    rule = int(2 * 4 * width / 3)
    if hidden < rule:
        raise ConversionError(f"{src}: FFN hidden size {hidden} is below Llama's rule int(8 * {width} / 3) = {rule} "
                              "(an ffn_dim_multiplier < 1), which twostage's AR model does not have")
    multiple = FFN_MULTIPLE if FFN_MULTIPLE * -(-rule // FFN_MULTIPLE) == hidden else hidden
    shape = {"layers": layers, "width": width, "heads": heads}
    size = next((name for name, s in AR_SHAPES.items() if s == (layers, width, heads)), None)
    model = {"size": size} if size else {"size": "B", **shape}
    model.update({"ffn_multiple_of": multiple, "prefix_rope": "zero", "norm_eps": 1e-5, "rope_base": 10000.0})
    return {"model": model, "vocab_size": vocab,
            "num_classes": state["cls_embedding.embedding_table.weight"].shape[0] - 1}


def mapped_state(model: ARTransformer, state: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """`model`'s state dict filled from the LlamaGen tensors; every tensor of `state` used."""
    ours = model.state_dict()
    out = gather_state(ours, {key: peer_keys(key) for key in ours}, state, src, "LlamaGen GPT of this shape")
    heads = model.cfg.shape[2]
    return {key: permute_qk(t, heads) if key.endswith(".attn.qkv.weight") else t for key, t in out.items()}


def convert_llamagen_gpt(src: Path, overrides: Sequence[str], tokenizer: Path) -> Converted:
    """An ar generator run config, model and model.json holding the LlamaGen GPT weights in `src`."""
    raw, entry = read_state_dict(src, ENTRIES)
    state, dropped = peer_state(raw)
    heads = parse_overrides(list(overrides)).get("model", {}).get("heads")
    arch = architecture(state, src, heads)
    cfg = configlib.load(ARRunConfig, {"kind": KIND, "model": arch["model"], "sample": SAMPLE}, list(overrides))
    meta = tokenizer_cache_meta(tokenizer, "tokens", arch["vocab_size"], arch["num_classes"], src,
                                expects=f"predicts {arch['vocab_size']} codes",
                                fix="give the VQ run the GPT was trained on (e.g. `twostage convert llamagen-vq "
                                    "vq_ds16_c2i.pt`)")
    model = ARTransformer(cfg.model, arch["vocab_size"], arch["num_classes"], meta.grid)
    model.load_state_dict(mapped_state(model, state, src), strict=True)
    record = model_record(KIND, model, meta, batch_size=cfg.train.batch_size, train_cache=tokenizer,
                          val_cache=None, train_samples=0)
    record.update({"train_cache": None, "train_samples": None})  # not trained here
    source = {"peer": PEER, "entry": entry, "dropped": dropped,
              "compiled_prefix": any(k.startswith(COMPILED) for k in raw)}
    return Converted(config=cfg, modules={MODULE: model}, converted_from=source, model_json=record)


__all__ = ["PEER", "peer_keys", "qk_row_order", "permute_qk", "architecture", "mapped_state", "convert_llamagen_gpt"]
