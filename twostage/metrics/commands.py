"""`twostage eval gen|recon|stats`: metrics with their protocol, printed and written as JSON.

    twostage eval gen samples.npz --ref fashion-mnist:test            # FD/sFD/IS/P/R-EffNetLite0
    twostage eval gen samples.npz --ref folder:/data/imagenet:val --network inception-v3 \\
        --weights pt_inception-2015-12-05-6726825d.pth               # FID/sFID/IS/Precision/Recall
    twostage eval recon runs/vq_f8                                    # rFD, PSNR, SSIM, PD, codebook usage
    twostage eval stats fashion-mnist:test --image-size 32            # pre-compute reference statistics

Samples: an .npz with uint8 images under arr_0 (ADM layout, NHWC) or `images`, labels under arr_1 or
`labels`, and optionally a `protocol` JSON string from the sampler (sampler, steps, cfg_scale,
cfg_interval, seed, precision, label_sampling). The offline default network is EfficientNet-Lite0;
its numbers are FD-EffNetLite0 etc., never "FID".
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command group to the top-level CLI."""
    top = subparsers.add_parser("eval", help="generation / reconstruction metrics with their protocol",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="eval_command", metavar="ACTION", required=True)

    g = sub.add_parser("gen", help="FD, sFD, IS-style score, precision/recall of a samples .npz")
    g.add_argument("samples", help="samples .npz (uint8 images under arr_0 or images)")
    g.add_argument("--ref", required=True, help="reference: fashion-mnist:test, folder:PATH[:val], npz:PATH[:val], "
                                                "or a statistics .npz from `eval stats`")
    g.add_argument("--resize", default="pad", choices=("pad", "resize_crop"),
                   help="how reference images are brought to the samples' size (default pad: 28 -> 32)")
    g.add_argument("--pr-k", type=int, default=3, help="k of improved precision/recall")
    g.add_argument("--is-splits", type=int, default=10)
    g.add_argument("--cache-dir", help="reference statistics cache (default $TWOSTAGE_CACHE/reference_stats)")
    _common(g)
    g.set_defaults(func=_guard(cmd_gen))

    r = sub.add_parser("recon", help="rFD (val reconstructions vs val), PSNR, SSIM, perceptual distance, usage")
    r.add_argument("run", help="tokenizer run folder (config.yaml + checkpoints/)")
    r.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    r.add_argument("--split", default="val", choices=("train", "val"))
    r.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    r.add_argument("--no-perceptual", action="store_true", help="skip the perceptual distance")
    r.add_argument("--uniformity-vectors", type=int, default=2000, metavar="N",
                   help="continuous (KL) runs: latent uniformity (VA-VAE Table 6: t-SNE + KDE) of N latent vectors, "
                        "one random position per image; 0 skips it (the paper uses 10000; t-SNE time grows ~N log N)")
    _common(r)
    r.set_defaults(func=_guard(cmd_recon))

    s = sub.add_parser("stats", help="compute and cache the statistics of a reference split")
    s.add_argument("ref", help="fashion-mnist:test, folder:PATH[:val], npz:PATH[:val]")
    s.add_argument("--image-size", type=int, required=True, help="image size of the samples to compare with")
    s.add_argument("--resize", default="pad", choices=("pad", "resize_crop"))
    s.add_argument("--max-images", type=int)
    s.add_argument("--cache-dir")
    _common(s, out=False)
    s.add_argument("--out", help="also write the statistics to this .npz (usable as --ref)")
    s.set_defaults(func=_guard(cmd_stats))


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--network", default="effnet-lite0",
                   help="feature network: effnet-lite0 (default, offline), inception-v3, dinov2 (need --weights)")
    p.add_argument("--weights", help="local weights file of the feature network")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="feature extraction precision")
    if out:
        p.add_argument("--out", help="result JSON path (default: next to the input)")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known failure kinds become one message and exit code 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (FileNotFoundError, ValueError, ImportError) as err:
            print(f"eval error: {err}", file=sys.stderr)
            return 1

    return run


def _command_line() -> str:
    return "twostage " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print(metrics: dict[str, float], proto: dict, path: Path) -> None:
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    keys = ("num_samples", "label_sampling", "sampler", "steps", "cfg_scale", "precision", "feature_network",
            "feature_checksum", "reference", "seed")
    print("protocol: " + ", ".join(f"{k}={proto.get(k)}" for k in keys))
    print(f"wrote {path}")


def cmd_gen(args: argparse.Namespace) -> int:
    from twostage.metrics.features import load_feature_network
    from twostage.metrics.generation import evaluate_generation, load_samples
    from twostage.metrics.protocol import write_result

    samples = load_samples(args.samples)
    net = load_feature_network(args.network, args.weights)
    metrics, proto = evaluate_generation(samples, args.ref, net, batch_size=args.batch_size,
                                         device=_device(args.device), precision=args.precision,
                                         resize=args.resize, cache_dir=args.cache_dir, is_splits=args.is_splits,
                                         pr_k=args.pr_k)
    out = Path(args.out) if args.out else Path(args.samples).with_suffix(f".eval-{net.name}.json")
    write_result(out, metrics, proto, _command_line())
    _print(metrics, proto.to_dict(), out)
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    from twostage.data.build import build_dataset
    from twostage.data.datasets import SubsetDataset
    from twostage.metrics.features import load_feature_network
    from twostage.metrics.latent import codebook_usage
    from twostage.metrics.protocol import write_result
    from twostage.metrics.reconstruction import evaluate_reconstruction

    from twostage.tokenizers.kl.tokenizer import KLTokenizer, is_kl_run
    from twostage.tokenizers.vq.tokenizer import Tokenizer

    device = _device(args.device)
    kl = is_kl_run(args.run)
    tok = (KLTokenizer if kl else Tokenizer).from_pretrained(args.run, device=device, step=args.step)
    dataset = build_dataset(tok.config.data, args.split)  # int keys: never augmented
    if args.max_images is not None and args.max_images < len(dataset):
        import numpy as np

        dataset = SubsetDataset(dataset, np.arange(args.max_images))
    indices: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        if kl:  # the posterior mean, decoded; kept for the latent-uniformity numbers
            z = tok.encode(x)
            latents.append(z.cpu())
            return tok.decode(z)
        # one forward gives both the reconstruction and the codes (for usage / perplexity)
        out = tok.model(tok._input(x))
        indices.append(out.quant.indices.cpu())
        return out.recon.float().clamp(-1, 1)

    net = load_feature_network(args.network, args.weights)
    metrics, proto = evaluate_reconstruction(
        reconstruct, dataset, net, batch_size=args.batch_size, device=device, precision=args.precision,
        perceptual=not args.no_perceptual,
        reference=f"{tok.config.data.name}:{args.split} reconstructions vs the same images "
                  f"({tok.config.data.image_size}px, {tok.config.data.resize})",
        protocol={"tokenizer_run": str(args.run), "tokenizer_step": tok.step, "tokenizer_checksum": tok.checksum},
    )
    if indices:
        usage = codebook_usage(torch.cat([i.flatten() for i in indices]), tok.codebook_size)
        metrics["codebook_usage"], metrics["codebook_perplexity"] = usage["usage"], usage["perplexity"]
    if latents and args.uniformity_vectors > 0:
        from twostage.metrics.latent import latent_uniformity

        uni = latent_uniformity(torch.cat(latents), num=args.uniformity_vectors)
        metrics.update({f"latent_uniformity_{k}": v for k, v in uni.items() if k not in ("num_vectors", "runs")})
        metrics["latent_uniformity_vectors"] = int(uni["num_vectors"])
    step = f"step{tok.step}" if tok.step is not None else "latest"
    out = Path(args.out) if args.out else Path(args.run) / "eval" / f"recon-{args.split}-{net.name}-{step}.json"
    write_result(out, metrics, proto, _command_line())
    _print(metrics, proto.to_dict(), out)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from twostage.metrics.features import load_feature_network
    from twostage.metrics.reference import reference_stats

    net = load_feature_network(args.network, args.weights)
    stats, path = reference_stats(args.ref, net.to(_device(args.device)), args.image_size, resize=args.resize,
                                  max_images=args.max_images, batch_size=args.batch_size,
                                  device=_device(args.device), precision=args.precision, cache_dir=args.cache_dir)
    if args.out:
        path = stats.save(args.out)
    print(json.dumps(stats.protocol, indent=2))
    print(f"statistics of {stats.pool.n} images: {path}")
    return 0
