"""K seeds of the VQ tokenizer as stacked replicas in one process against K separate models.

    python benchmarks/bench_tokenizer_replicas.py --replicas 1 3 6 --steps 60 --compile on       # H200
    python benchmarks/bench_tokenizer_replicas.py --device cpu --replicas 1 2 --steps 2 --warmup 1 \
        --batch-size 4 --compile off                                                               # smoke test

A study trains every tokenizer config with several seeds. Six vq_fmnist_f4 runs in six processes share
one H200 at ~54 aggregate steps/s: each step is ~1500 small kernels, ~16 ms of device time (11% of the
bf16 peak), and the processes take turns on the GPU (results/throughput/README.md section 5). The generators get past this by stacking K
replicas' weights and running one vmapped, compiled loss (twostage/engine/replicas.py); this measures
whether the same holds for the tokenizer's autoencoder step (pixel L2 + perceptual + VQ losses, Adam,
per-replica gradient clipping; no GAN: the preset's discriminator starts at step 10000). Modes:

  stacked   one StackedModule of K models, loss = vmap(one replica's loss)(stacked weights, (K, B, ...)
            images).sum(), compiled with --compile on; one fused Adam over the (K, ...) parameters.
  separate  K models in this process, each with its own compiled loss and Adam, stepped one after another.

Printed per (K, mode): ms per step (all K replicas), ms per replica-step, aggregate replica-steps/s, the
model-FLOP utilization against 790 TFLOP/s (dense bf16; FLOPs of one replica-step counted once on the
CPU by bench_study.tokenizer_step_flops), and peak GPU memory. Synthetic images, the same each step.
At the end, on the CPU without compile: a check that the stacked loss and gradients of K=2 equal the two
separate models' (no randomness in the models), in float64 (the verdict) and float32 (for information).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twostage import api  # noqa: E402
from twostage.engine.replicas import StackedModule, clip_per_replica_  # noqa: E402
from twostage.tokenizers.perceptual import build_perceptual  # noqa: E402
from twostage.tokenizers.vq.model import VQModel, VQOutput  # noqa: E402

PEAK_BF16 = 790e12  # FLOP/s, dense bf16 (H200)
PRESET = "vq_fmnist_f4"
SHARED_NOTE = ("separate = K models stepped in turn in ONE process; a study runs K separate processes sharing "
               "the GPU: six study_crt tokenizers made ~54 aggregate steps/s on an H200, bound by ~16-17 ms of "
               "device time per step (results/throughput/README.md section 5)")


def tokenizer_loss(out: VQOutput, images: torch.Tensor, perceptual: nn.Module | None, lc: Any) -> torch.Tensor:
    """One replica's autoencoder loss, as VQTokenizerTask.autoencoder_loss computes it before the GAN
    starts. Not that method itself: its codebook-usage monitor updates the task's tensors in place
    (index_fill_ on shared state), which a vmapped function may not do."""
    pixel = F.mse_loss(out.recon.float(), images.float())
    loss = lc.pixel_weight * pixel
    if perceptual is not None:  # frozen and unbatched: vmap batches only its input
        loss = loss + lc.perceptual_weight * perceptual(out.recon, images).mean()
    return loss + out.quant.loss


def build(cfg: Any, k: int, device: torch.device, stacked: bool) -> list[nn.Module]:
    """K models seeded 0..K-1, on the device; NHWC on CUDA as AutoencoderTask lays them out there. Models to
    be stacked leave the codes' layout alone (VQModel.channels_last_codes: vmap cannot re-lay a batched
    tensor out NHWC; the quantizer's permute of (N, h, w, D) gives NHWC strides already)."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = VQModel(cfg.model).to(device).train()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            model.channels_last_codes = not stacked
        models.append(model)
    return models


def adam(params: list[nn.Parameter], cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim.ae
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), fused=True if device.type == "cuda" else None)


def autocast(device: torch.device):
    # As the trainer: bf16 autocast around the loss on CUDA (train.precision=auto), fp32 elsewhere.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def stacked_step(cfg: Any, models: list[nn.Module], perceptual: nn.Module | None, device: torch.device,
                 compile_: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training step of the K models stacked, as ReplicaTask runs a generator's: (K, B, ...) images in,
    the K losses out (device tensors: no host sync)."""
    stacked = StackedModule(models).to(device)
    if device.type == "cuda":  # keep each replica's conv weight slice NHWC, as the separate models have it
        for w in stacked.weights:
            if w.ndim == 5:
                w.data = w.data.contiguous(memory_format=torch.channels_last_3d)
    base, lc, k = stacked.base, cfg.loss, stacked.replicas

    def one(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return tokenizer_loss(functional_call(base, weights, (x,)), x, perceptual, lc)

    def losses(weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels fail under vmap (replicas.py)
            return vmap(one, randomness="different")(weights, images)

    run = torch.compile(losses) if compile_ else losses
    params = list(stacked.parameters())
    opt = adam(params, cfg, device)

    def step(images: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            values = run(stacked.stacked(), images)
        values.sum().backward()  # the sum: each replica's gradient is its own loss's
        clip_per_replica_(params, cfg.optim.ae.grad_clip, k)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return values.detach()

    return step


def separate_step(cfg: Any, models: list[nn.Module], perceptual: nn.Module | None, device: torch.device,
                  compile_: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training step of each of the K models in turn, each with its own compiled loss and Adam."""
    lc = cfg.loss

    def make(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = lambda x: tokenizer_loss(model(x), x, perceptual, lc)  # noqa: E731
        return torch.compile(fn) if compile_ else fn

    losses = [make(m) for m in models]
    opts = [adam(list(m.parameters()), cfg, device) for m in models]

    def step(images: torch.Tensor) -> torch.Tensor:
        out = []
        for model, loss_fn, opt, x in zip(models, losses, opts, images):
            with autocast(device):
                loss = loss_fn(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.ae.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.detach())
        return torch.stack(out)

    return step


def synthetic_images(k: int, batch: int, device: torch.device) -> torch.Tensor:
    """(K, B, 3, 32, 32) in [-1, 1]; each (B, 3, 32, 32) slice NHWC on CUDA (a view of one NHWC batch)."""
    x = torch.rand(k * batch, 3, 32, 32, device=device) * 2 - 1
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.view(k, batch, 3, 32, 32)


def time_steps(step: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, warmup: int, steps: int,
               device: torch.device) -> float:
    """Seconds per step over `steps` steps after `warmup` (compilation); host syncs only around them."""
    for _ in range(warmup):
        step(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def check_differences(perceptual_on: bool, dtype: torch.dtype, batch: int = 4) -> tuple[float, float]:
    """K=2 on the CPU, eager, in `dtype`: (relative difference of the stacked loss from the sum of the two
    separate models' losses, max over parameters and replicas of the relative difference of replica k's
    gradient slice from model k's gradient). No randomness in model or loss: equal up to rounding."""
    cfg = api.load_config(PRESET, ["train.device=cpu"] + ([] if perceptual_on else ["loss.perceptual_weight=0"]))
    cpu = torch.device("cpu")
    perceptual = make_perceptual(cfg, cpu)
    perceptual = perceptual.to(dtype) if perceptual is not None else None
    models = [m.to(dtype) for m in build(cfg, 2, cpu, stacked=True)]
    stacked = StackedModule([copy.deepcopy(m) for m in models])
    images = synthetic_images(2, batch, cpu).to(dtype)
    one = lambda w, x: tokenizer_loss(functional_call(stacked.base, w, (x,)), x, perceptual, cfg.loss)  # noqa: E731
    total = vmap(one, randomness="different")(stacked.stacked(), images).sum()
    total.backward()
    separate = 0.0
    for model, x in zip(models, images):
        loss = tokenizer_loss(model(x), x, perceptual, cfg.loss)
        loss.backward()
        separate += loss.item()
    dgrad = 0.0
    for name, w in zip(stacked.names, stacked.weights):
        for k, model in enumerate(models):
            ref = model.get_parameter(name).grad
            dgrad = max(dgrad, ((w.grad[k] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    return abs(total.item() - separate) / abs(separate), dgrad


def check(perceptual_on: bool) -> str:
    """The verdict rests on float64 gradients (the same arithmetic up to rounding: ~1e-14; the loss only to
    float32 rounding, as PerceptualLoss reduces its distances in float32). In float32 the loss agrees to
    ~1e-7, but with the perceptual loss on the gradients only to ~1e-2 relative: grouped (vmapped) and plain
    convolutions round differently, and the perceptual term amplifies that: one plain model's float32
    gradients differ from its own float64 ones by as much (3.5e-3 measured), and float64 shows it is rounding."""
    l64, g64 = check_differences(perceptual_on, torch.float64)
    l32, g32 = check_differences(perceptual_on, torch.float32)
    verdict = "ok" if l64 < 1e-6 and g64 < 1e-8 and l32 < 1e-5 else "FAILED"
    return (f"check: {verdict} (K=2, batch 4, CPU eager, perceptual {'on' if perceptual_on else 'off'}; stacked vs "
            f"separate, relative max differences: float64 loss {l64:.1e} grads {g64:.1e}; "
            f"float32 loss {l32:.1e} grads {g32:.1e})")


def make_perceptual(cfg: Any, device: torch.device) -> nn.Module | None:
    """The frozen perceptual network, built once and shared by all replicas (as AutoencoderTask builds it)."""
    lc = cfg.loss
    if lc.perceptual_weight <= 0:
        return None
    net = build_perceptual(lc.perceptual, weights=lc.lpips_weights, heads=lc.lpips_heads,
                           random_init=lc.lpips_random_init, size=lc.perceptual_size).to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--replicas", nargs="+", type=int, default=[1, 3, 6])
    p.add_argument("--modes", nargs="+", choices=["separate", "stacked"], default=["separate", "stacked"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=None, help="images per replica-step (default: the preset's)")
    p.add_argument("--compile", choices=["on", "off"], default="on")
    p.add_argument("--perceptual", choices=["on", "off"], default="on")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"# {shlex.join(['python', *sys.argv])} | torch {torch.__version__} | {name} | {date}")
    overrides = [f"train.device={args.device}"] + ([] if args.perceptual == "on" else ["loss.perceptual_weight=0"])
    cfg = api.load_config(PRESET, overrides)
    batch = args.batch_size or cfg.train.batch_size
    cfg = api.load_config(PRESET, [*overrides, f"train.batch_size={batch}"])
    for option in ("recompile_limit", "cache_size_limit"):  # separate mode compiles one loss per model
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 64)

    from bench_study import tokenizer_step_flops  # benchmarks/ is on sys.path when run as a script

    flops = tokenizer_step_flops("vq", cfg, step=0, count_batch=min(4, batch))  # one replica-step, scaled
    print(f"# {PRESET}, batch {batch} per replica, perceptual {args.perceptual}, compile {args.compile}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {flops / 1e12:.3f} TFLOP per replica-step")
    print(f"# {SHARED_NOTE}")
    print(f"{'K':>3s} {'mode':>9s} {'ms/step':>9s} {'ms/replica-step':>16s} {'replica-steps/s':>16s} "
          f"{'MFU %':>6s} {'peak GiB':>9s}")
    perceptual = make_perceptual(cfg, device)
    for k in args.replicas:
        for mode in args.modes:
            torch._dynamo.reset()  # each row compiles afresh; earlier rows' graphs do not count to the limit
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                make = stacked_step if mode == "stacked" else separate_step
                models = build(cfg, k, device, stacked=mode == "stacked")
                step = make(cfg, models, perceptual, device, args.compile == "on")
                t = time_steps(step, synthetic_images(k, batch, device), args.warmup, args.steps, device)
                mfu = f"{k * flops / t / PEAK_BF16 * 100:6.2f}" if cuda else f"{'-':>6s}"
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:9.2f}" if cuda else f"{'-':>9s}"
                print(f"{k:3d} {mode:>9s} {t * 1e3:9.2f} {t / k * 1e3:16.2f} {k / t:16.2f} {mfu} {peak}", flush=True)
            except Exception as err:  # noqa: BLE001 - one failing configuration should not end the table
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                print(f"{k:3d} {mode:>9s} failed: {type(err).__name__}: {first[:200]}", flush=True)
            finally:
                step = models = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    print(check(args.perceptual == "on"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
