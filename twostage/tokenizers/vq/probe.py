"""How predictable are a frozen tokenizer's latents? A fresh causal probe measures it.

CRT trains the encoder so that each latent is predictable from the ones before it. To compare
tokenizers fairly (with or without CRT), we freeze each one, extract its latents, fit a *new* 2-layer
causal transformer (the same architecture as the CRT predictor, never the one trained with the
tokenizer) on the training split, and report the next-latent l2 error on held-out images: overall
and per raster position. Lower means stage 2 faces an easier sequence.

Two latent views are probed: the l2-normalized pre-quantization latent (what CRT regularizes) and
the l2-normalized quantized code vectors (what a stage-2 model actually sees, up to the codebook).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from twostage.common.atomic import write_text_atomic
from twostage.tokenizers.vq.crt import CausalPredictor


@dataclass
class ProbeResult:
    view: str
    train_images: int
    val_images: int
    steps: int
    val_error: float  # mean over positions of ||g(z_<i) - z_i||^2 on normalized latents
    val_error_per_position: list[float]
    train_error: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def extract_latents(model, images: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"):
    """(pre-quantization latents, quantized latents), both l2-normalized over channels, (N, D, h, w)."""
    pre, post = [], []
    model = model.to(device).eval()
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        latent = model.encode_latent(x).float()
        quant = model.quantizer(latent).z_q.float()
        pre.append(F.normalize(latent, dim=1).cpu())
        post.append(F.normalize(quant, dim=1).cpu())
    return torch.cat(pre), torch.cat(post)


def _errors(probe: CausalPredictor, latents: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Per-position squared error summed over channels, averaged over images: (L,)."""
    total = torch.zeros(latents.shape[2] * latents.shape[3], dtype=torch.float64)
    probe.eval()
    with torch.no_grad():
        for start in range(0, len(latents), batch_size):
            z = latents[start:start + batch_size].to(device)
            target = z.flatten(2).transpose(1, 2)
            err = (probe(z).float() - target).pow(2).sum(-1)  # (B, L)
            total += err.sum(0).double().cpu()
    return total / len(latents)


def fit_probe(
    train_latents: torch.Tensor,
    val_latents: torch.Tensor,
    view: str,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-4,
    width: int = 256,
    layers: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Fit a fresh causal probe on `train_latents`; report its held-out next-latent error."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    _, dim, h, w = train_latents.shape
    probe = CausalPredictor(dim, (h, w), width=width, layers=layers, heads=max(1, width // 64)).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    probe.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_latents), (batch_size,), generator=gen)
        z = train_latents[idx].to(device)
        target = z.flatten(2).transpose(1, 2)
        loss = (probe(z).float() - target).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        opt.step()
        sched.step()
    val = _errors(probe, val_latents, batch_size, device)
    train = _errors(probe, train_latents[: len(val_latents)], batch_size, device)
    return ProbeResult(view, len(train_latents), len(val_latents), steps, float(val.mean()),
                       [float(v) for v in val], float(train.mean()))


def probe_tokenizer(model, train_images: torch.Tensor, val_images: torch.Tensor, **kwargs) -> dict[str, ProbeResult]:
    """Probe both latent views of a frozen VQ model (anything with encode_latent and quantizer)."""
    device = kwargs.get("device", "cpu")
    train_pre, train_post = extract_latents(model, train_images, device=device)
    val_pre, val_post = extract_latents(model, val_images, device=device)
    return {
        "pre_quant": fit_probe(train_pre, val_pre, "pre_quant", **kwargs),
        "quantized": fit_probe(train_post, val_post, "quantized", **kwargs),
    }


def probe_run(run: str | Path, *, train_images: int = 10000, val_images: int = 2000, steps: int = 2000,
              batch_size: int = 256, seed: int = 0, device: str = "auto", num_workers: int = 0,
              step: int | None = None, weights: str = "auto", out: str | Path | None = None) -> tuple[Path, dict]:
    """Probe a VQ tokenizer run folder; write the record to `out` (default RUN/eval/probe-stepN.json)."""
    from twostage.engine.run_files import RunLoadError
    from twostage.tokenizers.base import load_tokenizer
    from twostage.tokenizers.run import split_loader

    tok = load_tokenizer(run, device=device, step=step, weights=weights)
    if not hasattr(tok.model, "quantizer"):
        raise RunLoadError(f"{run} holds a {tok.kind!r} tokenizer (e.g. a KL-VAE); the probe measures the "
                           "pre-quantization and code latents of a VQ tokenizer")
    start = time.perf_counter()

    def images(split: str, limit: int) -> torch.Tensor:
        _, loader = split_loader(tok.config, split, batch_size, limit=limit, num_workers=num_workers)
        return tok.prepare(torch.cat([x for x, _ in loader])).cpu()

    results = probe_tokenizer(tok.model, images("train", train_images), images("val", val_images), steps=steps,
                              batch_size=batch_size, seed=seed, device=tok.device)
    record = {
        "metric": "held-out next-latent l2 error of a fresh 2-layer causal probe (l2-normalized latents)",
        "tokenizer_run": str(run), "tokenizer_step": tok.step, "tokenizer_checksum": tok.checksum,
        "crt_enabled": bool(tok.config.crt.enabled), "seed": seed, "wall_s": round(time.perf_counter() - start, 2),
        "views": {view: r.to_dict() for view, r in results.items()},
    }
    path = Path(out) if out is not None else Path(run) / "eval" / f"probe-step{tok.step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2))
    return path, record

