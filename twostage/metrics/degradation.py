"""Sanity study of the offline metric: Fashion-MNIST train vs test, and degraded train sets.

    python -m twostage.metrics.degradation --out results/eval_fashion_mnist/ [--num 10000] [--device cuda]

A trustworthy FD must (a) be small for two samples of the same distribution (train vs test) and
(b) grow monotonically as the images are degraded. Here `num` training images (a fixed random
subset) are compared with `num` test images, clean and after Gaussian blur or additive Gaussian
noise of increasing strength. Writes results.json (numbers + protocol + command) and results.md.

Protocol: 28x28 uint8 -> centred on a 32x32 black canvas (the data layer's "pad", what the
generators see) -> degradation at 32x32 in [0, 255] -> rounded to uint8 (as saved samples would be)
-> gray repeated to RGB -> EfficientNet-Lite0 preprocessing (bilinear antialiased 32 -> 224,
TF-Lite normalisation). The numbers are FD-EffNetLite0, not FID.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from twostage.backbones import load_feature_network
from twostage.metrics.extraction import extract_features
from twostage.metrics.frechet import feature_stats, frechet_distance
from twostage.metrics.precision_recall import precision_recall
from twostage.metrics.protocol import Protocol, device_description, metric_name

BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0)  # pixels at 32x32
NOISE_STDS = (0.02, 0.05, 0.1, 0.2)  # fraction of the [0, 255] range


def pad32(images: np.ndarray) -> np.ndarray:
    out = np.zeros((len(images), 32, 32), np.uint8)
    out[:, 2:30, 2:30] = images
    return out


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    x = gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma), mode="constant")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def noise(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = images.astype(np.float64) + rng.normal(0.0, std * 255.0, images.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def run(num: int, device: str, batch_size: int, precision: str, seed: int = 0, pr: bool = True) -> dict:
    from twostage.data import fashion_mnist

    fm = fashion_mnist.load()
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.choice(len(fm.train_images), num, replace=False))
    test_idx = np.sort(rng.choice(len(fm.test_images), min(num, len(fm.test_images)), replace=False))
    train = pad32(fm.train_images[train_idx])
    test = pad32(fm.test_images[test_idx])
    net = load_feature_network("effnet-lite0").to(device)

    def feats(images: np.ndarray) -> dict[str, torch.Tensor]:
        return extract_features(net, images[:, None], batch_size, device, precision, keys=("pool", "spatial"))

    t0 = time.time()
    ref = feats(test)
    ref_pool, ref_sp = feature_stats(ref["pool"].numpy()), feature_stats(ref["spatial"].numpy())
    sets = [("train (clean)", "none", 0.0, train)]
    sets += [(f"train + blur sigma={s}", "blur", s, blur(train, s)) for s in BLUR_SIGMAS]
    sets += [(f"train + noise std={s}", "noise", s, noise(train, s, seed + 1)) for s in NOISE_STDS]
    fd, sfd = metric_name("fd", net.name), metric_name("sfd", net.name)
    pn, rn = metric_name("precision", net.name), metric_name("recall", net.name)
    rows = []
    for label, kind, strength, images in sets:
        f = feats(images)
        sp, ss = feature_stats(f["pool"].numpy()), feature_stats(f["spatial"].numpy())
        row = {"set": label, "degradation": kind, "strength": strength,
               fd: frechet_distance(sp.mu, sp.sigma, ref_pool.mu, ref_pool.sigma),
               sfd: frechet_distance(ss.mu, ss.sigma, ref_sp.mu, ref_sp.sigma)}
        if pr:
            row[pn], row[rn] = precision_recall(ref["pool"].numpy(), f["pool"].numpy(), k=3, device=device)
        rows.append(row)
        print(f"{label:<24} {fd}={row[fd]:.4f}  {sfd}={row[sfd]:.4f}", flush=True)
    clean = rows[0][fd]
    monotonic = {}
    for kind in ("blur", "noise"):
        seq = [clean] + [r[fd] for r in rows if r["degradation"] == kind]
        monotonic[kind] = bool(all(b > a for a, b in zip(seq, seq[1:])))
    proto = Protocol(num_samples=num, label_sampling="none (uniform random subset of each split)",
                     sampler="none (real images)", precision=precision,
                     reference=f"fashion-mnist:test ({len(test)} images, 28px padded to 32px, gray->RGB)",
                     seed=seed, device=device_description(device)).with_network(net)
    proto.extra.update(blur="scipy gaussian_filter on 32x32, zero border", noise="additive N(0, (std*255)^2), seed+1",
                       quantization_after_degradation="round + clip to uint8", pr_k=3)
    return {"rows": rows, "monotonic_in_strength": monotonic, "protocol": proto.to_dict(),
            "seconds": round(time.time() - t0, 1)}


def markdown(result: dict, command: str) -> str:
    p = result["protocol"]
    keys = [k for k in result["rows"][0] if k not in ("set", "degradation", "strength")]
    lines = [
        "# Fashion-MNIST: FD-EffNetLite0 of train and degraded train vs test",
        "",
        f"- command: `{command}`",
        f"- date: {p['date']}; device: {p['device']}; wall time {result['seconds']} s",
        f"- {p['num_samples']} train images vs {p['reference']}",
        f"- feature network: {p['feature_network']} (sha256 {p['feature_checksum'][:16]}...), "
        f"{p['feature_preprocessing']}; precision {p['precision']}",
        f"- FD rises monotonically with strength: {result['monotonic_in_strength']}",
        "",
        "| set | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for r in result["rows"]:
        lines.append(f"| {r['set']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    lines += ["", "Not FID: the features are EfficientNet-Lite0's, so only differences within this table "
              "(and other FD-EffNetLite0 numbers with the same protocol) are comparable.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/eval_fashion_mnist/", help="output folder")
    ap.add_argument("--num", type=int, default=10_000, help="images per set (train subset and test)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    ap.add_argument("--name", default="results", help="file stem of the outputs")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    command = "python -m twostage.metrics.degradation " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = run(args.num, device, args.batch_size, args.precision, pr=not args.no_pr)
    result["command"] = command
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result, command))
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0 if all(result["monotonic_in_strength"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
