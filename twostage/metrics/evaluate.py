"""Evaluating what the other stages produce: a tokenizer run folder, a samples file.

    evaluate_tokenizer_run("runs/vq_f8")                          # -> RUN/eval/recon-val-<net>-stepN.json
    evaluate_samples_file("runs/ar/samples.npz", "fashion-mnist:test")

Both return {"metrics", "protocol", "path"} and write the same record as JSON with the command that
made it. A tokenizer's reconstructions go through its kind's public `encode` / `decode`, so one code
path serves every kind; what the codes say beyond reconstruction (codebook usage of ids, latent
uniformity of continuous latents) depends only on the kind of codes (CODE_METRICS).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import torch


def command_line() -> str:
    """The command being run, for the record (a library call records the script's argv)."""
    return "twostage " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _codebook_statistics(ids: torch.Tensor, meta: dict, uniformity_vectors: int) -> dict[str, float]:
    """Discrete codes: codebook usage (fraction of codes used on the split) and perplexity."""
    from twostage.metrics.latent import codebook_usage

    usage = codebook_usage(ids.flatten(), int(meta["codebook_size"]))
    return {"codebook_usage": usage["usage"], "codebook_perplexity": usage["perplexity"]}


def _latent_uniformity(latents: torch.Tensor, meta: dict, uniformity_vectors: int) -> dict[str, float]:
    """Continuous latents: uniformity (VA-VAE, arXiv:2501.01423 Table 6: t-SNE + KDE of one random
    latent vector per image); 0 vectors skips it (t-SNE time grows ~N log N)."""
    if uniformity_vectors <= 0:
        return {}
    from twostage.metrics.latent import latent_uniformity

    uni = latent_uniformity(latents, num=uniformity_vectors)
    out = {f"latent_uniformity_{k}": v for k, v in uni.items() if k not in ("num_vectors", "runs")}
    out["latent_uniformity_vectors"] = int(uni["num_vectors"])
    return out


# What the codes of a whole split say beyond reconstruction, by cache kind (twostage/data/token_cache.py).
CODE_METRICS = {"tokens": _codebook_statistics, "latents": _latent_uniformity}


def evaluate_tokenizer_run(run: str | Path, *, split: str = "val", step: int | None = None,
                           max_images: int | None = None, network: str = "effnet-lite0", weights: str | None = None,
                           batch_size: int = 100, device: str = "auto", precision: str = "fp32",
                           perceptual: bool = True, uniformity_vectors: int = 2000,
                           out: str | Path | None = None) -> dict[str, Any]:
    """rFD (reconstructions of a split vs the same images), PSNR, SSIM, perceptual distance, code statistics."""
    from twostage.backbones import load_feature_network
    from twostage.common.device import resolve_device
    from twostage.metrics.protocol import write_result
    from twostage.metrics.reconstruction import evaluate_reconstruction
    from twostage.tokenizers.base import load_tokenizer
    from twostage.tokenizers.run import split_loader

    dev = resolve_device(device)
    tok = load_tokenizer(run, device=dev, step=step)
    dataset, _ = split_loader(tok.config, split, batch_size, limit=max_images)  # int keys: never augmented
    codes: list[torch.Tensor] = []

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        z = tok.encode(x)
        codes.append(z.cpu())
        return tok.decode(z)

    net = load_feature_network(network, weights)
    data = tok.config.data
    metrics, proto = evaluate_reconstruction(
        reconstruct, dataset, net, batch_size=batch_size, device=dev, precision=precision, perceptual=perceptual,
        reference=f"{data.name}:{split} reconstructions vs the same images ({data.image_size}px, {data.resize})",
        protocol={"tokenizer_run": str(run), "tokenizer_kind": tok.kind, "tokenizer_step": tok.step,
                  "tokenizer_checksum": tok.checksum},
    )
    if codes:
        layout = tok.cache_layout()
        metrics.update(CODE_METRICS[layout.kind](torch.cat(codes), layout.meta, uniformity_vectors))
    name = f"step{tok.step}" if tok.step is not None else "latest"
    path = Path(out) if out else Path(run) / "eval" / f"recon-{split}-{net.name}-{name}.json"
    write_result(path, metrics, proto, command_line())
    return {"metrics": metrics, "protocol": proto.to_dict(), "path": path}


def evaluate_samples_file(samples: str | Path, ref: str, *, network: str = "effnet-lite0", weights: str | None = None,
                          batch_size: int = 100, device: str = "auto", precision: str = "fp32", resize: str = "pad",
                          cache_dir: str | None = None, is_splits: int = 10, pr_k: int = 3,
                          reference_max_images: int | None = None, out: str | Path | None = None, seed: int = 0,
                          fdinf: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                          bootstrap_resamples: int = 0) -> dict[str, Any]:
    """FD, sFD, IS-style score, precision / recall, FD-infinity and KID of a samples .npz against a
    reference (twostage/metrics/generation.py; the FD bootstrap interval with bootstrap_resamples > 0)."""
    from twostage.backbones import load_feature_network
    from twostage.common.device import resolve_device
    from twostage.metrics.generation import evaluate_generation, load_samples
    from twostage.metrics.protocol import write_result

    loaded = load_samples(samples)
    net = load_feature_network(network, weights)
    metrics, proto = evaluate_generation(loaded, ref, net, batch_size=batch_size, device=resolve_device(device),
                                         precision=precision, resize=resize, cache_dir=cache_dir,
                                         is_splits=is_splits, pr_k=pr_k,
                                         reference_max_images=reference_max_images, seed=seed, fdinf=fdinf,
                                         kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                         bootstrap_resamples=bootstrap_resamples)
    path = Path(out) if out else Path(samples).with_suffix(f".eval-{net.name}.json")
    write_result(path, metrics, proto, command_line())
    return {"metrics": metrics, "protocol": proto.to_dict(), "path": path}


__all__ = ["evaluate_tokenizer_run", "evaluate_samples_file", "command_line"]
