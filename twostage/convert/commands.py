"""`twostage convert FORMAT SRC --out RUN`: a published checkpoint as a twostage run folder.

    twostage convert llamagen-vq vq_ds16_c2i.pt --out runs/llamagen_vq16 data.name=folder data.root=/data/imagenet
    twostage tokenizer encode runs/llamagen_vq16 --split val --out caches/llamagen_vq16_val
    twostage eval recon runs/llamagen_vq16 --max-images 1000
    twostage convert llamagen-gpt c2i_B_256.pt --tokenizer runs/llamagen_vq16 --out runs/llamagen_gpt_b
    twostage generator sample runs/llamagen_gpt_b --num 1000 --out samples/llamagen_gpt_b.npz
    twostage convert vavae vavae-imagenet256-f16d32-dinov2.pt --out runs/vavae      # KL autoencoders:
    twostage convert ldm-kl vae-ft-mse-840000-ema-pruned.safetensors --out runs/sd_vae model.scaling_factor=0.18215
    twostage convert diffusers-kl vae/diffusion_pytorch_model.safetensors --out runs/sd_vae_d   # reads vae/config.json

The model section of the run's config is read off the weights; `data.key=value` overrides set the
data that `tokenizer encode` and `eval recon` read from the run (a generator format takes
`sample.key=value`, and model fields the shapes cannot tell, e.g. model.heads; a KL autoencoder format
model.scaling_factor / shift_factor / encode_posterior). A generator format
needs --tokenizer, the run whose codes it predicts. --out must be a new or empty folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` and `export` commands to the top-level CLI."""
    from twostage.cli import OUT_FOLDER
    from twostage.convert import FORMATS

    table = "\n".join(f"  {f.name}: {f.summary}\n      download: {f.download}" for f in FORMATS.values())
    p = subparsers.add_parser("convert", help="a published checkpoint (e.g. LlamaGen's VQ) as a twostage run folder",
                              description=f"{__doc__}\nFormats:\n{table}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("src", type=Path, metavar="SRC", help="the published checkpoint file (.pt or .safetensors)")
    p.add_argument("overrides", nargs="*", help="data.key=value, e.g. data.name=folder data.root=/data/imagenet "
                                                "(a generator format: sample.key=value, model.heads=N)")
    p.add_argument("--tokenizer", type=Path, metavar="RUN", default=None,
                   help="generator formats: the tokenizer run whose codes the generator predicts")
    p.add_argument("--latent-stats", type=Path, metavar="FILE", default=None,
                   help="lightningdit: the latent statistics it was trained with (LightningDiT's latents_stats.pt)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.set_defaults(func=cmd_convert, out_kind=OUT_FOLDER)

    e = subparsers.add_parser("export", help="a run's weights as a Hub-style folder (config.json + model.safetensors)",
                              description="Write one step's weights of a tokenizer or generator run folder as "
                                          "config.json + model.safetensors (+ pretrained.json, model.json), which "
                                          "every twostage loader reads like the run folder (Python: "
                                          "twostage.save_pretrained).\n\n    twostage export runs/vq --out "
                                          "pretrained/vq_f4\n    twostage tokenizer encode pretrained/vq_f4 --split "
                                          "val --out caches/vq_val",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run", type=Path, help="tokenizer or generator run folder")
    e.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto",
                   help="auto: EMA when the checkpoint has it, else raw")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("--out", required=True, type=Path, help="folder to create (new or empty)")
    e.set_defaults(func=cmd_export, out_kind=OUT_FOLDER)


def cmd_export(args: argparse.Namespace) -> int:
    """Export the run's weights and say what was written."""
    import json

    from twostage.api import save_pretrained

    out = save_pretrained(args.run, args.out, weights=args.weights, step=args.step)
    record = json.loads((out / "pretrained.json").read_text())
    print(f"exported {args.run} (step {record['step']}, {record['weights']} weights) -> {out} "
          f"({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert SRC into the run folder --out and say where it is."""
    from twostage.convert import convert

    out = convert(args.format, args.src, args.out, args.overrides, tokenizer=args.tokenizer,
                  latent_stats=args.latent_stats)
    files = "config.yaml, model.json" if (out / "model.json").is_file() else "config.yaml"
    print(f"converted {args.src} ({args.format}) -> {out} ({files}, checkpoints/step_0000000)")
    return 0
