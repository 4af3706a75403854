"""`twostage eval gen|recon|stats`: metrics with their protocol, printed and written as JSON.

    twostage eval gen samples.npz --ref fashion-mnist:test            # FD/sFD/IS/P/R-EffNetLite0
    twostage eval gen samples.npz --ref folder:/data/imagenet:val --network inception-v3 \\
        --weights pt_inception-2015-12-05-6726825d.pth               # FID/sFID/IS/Precision/Recall
    twostage eval gen samples.npz --ref VIRTUAL_imagenet256_labeled.npz --network inception-v3 \
        --weights inception-2015-12-05.pt                             # ADM's reference batch, its mu/sigma
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
from pathlib import Path



def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command group to the top-level CLI."""
    top = subparsers.add_parser("eval", help="generation / reconstruction metrics with their protocol",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="eval_command", metavar="ACTION", required=True)

    g = sub.add_parser("gen", help="FD, sFD, IS-style score, precision/recall of a samples .npz")
    g.add_argument("samples", help="samples .npz (uint8 images under arr_0 or images)")
    g.add_argument("--ref", required=True, help="reference: fashion-mnist:test, folder:PATH[:val], npz:PATH[:val], "
                                                "a statistics .npz from `eval stats`, or an ADM reference batch "
                                                "(its mu/sigma with inception-v3, else features of its arr_0)")
    g.add_argument("--resize", default="pad", choices=("pad", "resize_crop"),
                   help="how reference images are brought to the samples' size (default pad: 28 -> 32)")
    g.add_argument("--pr-k", type=int, default=3, help="k of improved precision/recall")
    g.add_argument("--is-splits", type=int, default=10)
    g.add_argument("--cache-dir", help="reference statistics cache (default $TWOSTAGE_CACHE/reference_stats)")
    g.add_argument("--ref-max-images", type=int,
                   help="reference statistics over its first N images only (numbers then compare only at that N)")
    g.add_argument("--no-fdinf", action="store_true", help="skip FDinf-<net> (FD extrapolated to N = inf)")
    g.add_argument("--kid-subsets", type=int, default=100, metavar="K",
                   help="KID-<net> over K subsets (0 skips KID; needs raw reference features)")
    g.add_argument("--kid-subset-size", type=int, default=1000, metavar="M")
    g.add_argument("--fd-bootstrap", type=int, default=0, metavar="R",
                   help="FD-<net>_low/_high from R bootstrap resamples (e.g. 200; ~2-3 min on 2 CPU cores)")
    g.add_argument("--metric-seed", type=int, default=0, help="seed of IS shuffling, P/R, FDinf, KID and bootstrap draws")
    _common(g)
    g.set_defaults(func=cmd_gen)

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
    r.set_defaults(func=cmd_recon)

    s = sub.add_parser("stats", help="compute and cache the statistics of a reference split")
    s.add_argument("ref", help="fashion-mnist:test, folder:PATH[:val], npz:PATH[:val]")
    s.add_argument("--image-size", type=int, required=True, help="image size of the samples to compare with")
    s.add_argument("--resize", default="pad", choices=("pad", "resize_crop"))
    s.add_argument("--max-images", type=int)
    s.add_argument("--cache-dir")
    _common(s, out=False)
    s.add_argument("--out", help="also write the statistics to this .npz (usable as --ref; ADM's keys mu, sigma, "
                                 "mu_s, sigma_s)")
    s.set_defaults(func=cmd_stats)


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--network", default="effnet-lite0",
                   help="feature network: effnet-lite0 (default, offline), inception-v3, dinov2 (need --weights)")
    p.add_argument("--weights", help="local weights file of the feature network")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="feature extraction precision")
    if out:
        p.add_argument("--out", help="result JSON path (default: next to the input)")


def _print(metrics: dict[str, float], proto: dict, path: Path) -> None:
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    keys = ("num_samples", "label_sampling", "sampler", "steps", "cfg_scale", "precision", "feature_network",
            "feature_checksum", "reference", "seed")
    print("protocol: " + ", ".join(f"{k}={proto.get(k)}" for k in keys))
    print(f"wrote {path}")


def cmd_gen(args: argparse.Namespace) -> int:
    from twostage import api

    result = api.evaluate_generation(args.samples, args.ref, network=args.network, weights=args.weights,
                                     batch_size=args.batch_size, device=args.device, precision=args.precision,
                                     resize=args.resize, cache_dir=args.cache_dir, is_splits=args.is_splits,
                                     pr_k=args.pr_k, reference_max_images=args.ref_max_images, out=args.out,
                                     seed=args.metric_seed, fdinf=not args.no_fdinf, kid_subsets=args.kid_subsets,
                                     kid_subset_size=args.kid_subset_size, bootstrap_resamples=args.fd_bootstrap)
    _print(result["metrics"], result["protocol"], result["path"])
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    from twostage import api

    result = api.evaluate_reconstruction(args.run, split=args.split, step=args.step, max_images=args.max_images,
                                         network=args.network, weights=args.weights, batch_size=args.batch_size,
                                         device=args.device, precision=args.precision,
                                         perceptual=not args.no_perceptual,
                                         uniformity_vectors=args.uniformity_vectors, out=args.out)
    _print(result["metrics"], result["protocol"], result["path"])
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from twostage.backbones import load_feature_network
    from twostage.common.device import resolve_device
    from twostage.metrics.reference import reference_stats

    net = load_feature_network(args.network, args.weights)
    stats, path = reference_stats(args.ref, net.to(resolve_device(args.device)), args.image_size, resize=args.resize,
                                  max_images=args.max_images, batch_size=args.batch_size,
                                  device=resolve_device(args.device), precision=args.precision, cache_dir=args.cache_dir)
    if args.out:
        path = stats.save(args.out)
    print(json.dumps(stats.protocol, indent=2))
    print(f"statistics of {stats.pool.n} images: {path}")
    return 0
