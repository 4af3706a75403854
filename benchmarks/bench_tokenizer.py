"""Tokenizer training throughput: the ImageNet-256 VQ-16 recipe on synthetic input, with and without CRT.

One timed step is the full training step of `VQTokenizerTask` as the engine runs it: autoencoder phase
(encoder + quantizer + decoder + LPIPS-VGG16 (random weights) + PatchGAN generator loss [+ CRT]) with
backward, grad clipping and fused Adam steps, then the discriminator phase on the cached reconstruction.
bf16 autocast on CUDA, channels_last, SDPA attention; the timed loop never waits on the GPU except at
its two ends.

    python benchmarks/bench_tokenizer.py --batch-size 32 --steps 30            # eager
    python benchmarks/bench_tokenizer.py --batch-size 32 --steps 30 --compile  # torch.compile'd modules
    python benchmarks/bench_tokenizer.py --small --device cpu --steps 2        # CPU smoke test

Target (H100): >= 105 images/s without CRT at batch 16-32; CRT adding <= 10% step time.

Measured on one H100 80GB (torch 2.11+cu130, bf16, full step incl. LPIPS-VGG and both GAN updates):
    eager   (NCHW)  batch 16: 107.6 img/s   batch 32: 117.8 img/s, CRT +0.6%, 31.7 GiB peak
    compile (NHWC)  batch 16: 130.5 img/s   batch 32: 146.8 img/s, CRT +0.6%, 22.7 GiB peak (~3 min warm-up)
    eager NHWC is slower (87 img/s at 32): GroupNorm copies NHWC activations to NCHW; hence the layouts.
--sync-debug ran the eager loop with torch.cuda.set_sync_debug_mode("error"): no host syncs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twostage import config as configlib  # noqa: E402
from twostage.engine.optim import build_optimizer  # noqa: E402
from twostage.engine.task import PhaseContext  # noqa: E402
from twostage.tokenizers.vq.config import VQRunConfig  # noqa: E402
from twostage.tokenizers.vq.task import VQTokenizerTask  # noqa: E402

SMALL = ["model.base_channels=32", "model.channel_mult=[1,2,2,4]", "model.z_channels=64", "loss.disc_channels=16",
         "crt.width=64", "crt.heads=2"]  # fmt: skip


def build(args: argparse.Namespace, crt: bool, device: torch.device):
    overrides = [
        "data.root=/synthetic", f"data.image_size={args.image_size}", "loss.lpips_random_init=true",
        "loss.disc_start=0", f"crt.enabled={str(crt).lower()}", f"train.device={device}",
        f"train.compile={str(args.compile).lower()}", f"train.batch_size={args.batch_size}",
        f"model.codebook_size={args.codebook_size}",
    ] + (SMALL if args.small else []) + args.override  # fmt: skip
    cfg = configlib.load(VQRunConfig, "vq16_imagenet256", overrides)
    torch.manual_seed(0)
    layout = {"auto": None, "nhwc": True, "nchw": False}[args.layout]
    task = VQTokenizerTask(cfg, channels_last=layout if device.type == "cuda" else False)
    for module in task.modules.values():
        module.to(device).train()
    if args.compile:
        for module in task.modules.values():
            module.compile()
    specs = task.optimizers()
    opts = {n: build_optimizer([task.modules[m] for m in s.modules], s.config, device) for n, s in specs.items()}
    return task, specs, opts, cfg


def train_step(task, specs, opts, phases, batch, step, device, autocast) -> None:
    """One engine step (see twostage/engine/trainer.py `_run_phase`), without logging."""
    scratch: dict = {}
    for phase in phases:
        if not phase.active(step):
            continue
        trained = {m for o in phase.optimizers for m in specs[o].modules}
        for name, module in task.modules.items():
            module.requires_grad_(name in trained)
        for o in phase.optimizers:
            opts[o].zero_grad(set_to_none=True)
        with autocast():
            loss, _ = phase.loss(PhaseContext(batch, step, task.modules, scratch, device))
        loss.backward()
        for o in phase.optimizers:
            clip = specs[o].config.grad_clip
            if clip is not None:
                params = [p for g in opts[o].param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opts[o].step()
    for module in task.modules.values():
        module.requires_grad_(True)


def measure(args: argparse.Namespace, crt: bool, device: torch.device) -> dict:
    task, specs, opts, cfg = build(args, crt, device)
    phases = task.phases()
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    gen = torch.Generator(device=device).manual_seed(0)
    # A few distinct synthetic batches, resident on the device (no loader in the measurement).
    batches = [
        (torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device, generator=gen) * 2 - 1,
         torch.zeros(args.batch_size, dtype=torch.long, device=device))
        for _ in range(4)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for step in range(args.warmup):  # compile, cudnn autotuning, allocator warm-up
        train_step(task, specs, opts, phases, batches[step % 4], step, device, autocast)
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(activities=acts)
        prof.__enter__()
    if args.sync_debug and device.type == "cuda":  # raise on any host<->device sync in the timed loop
        torch.cuda.set_sync_debug_mode("error")
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        train_step(task, specs, opts, phases, batches[step % 4], step, device, autocast)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    sync()
    elapsed = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile))
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in task.modules.items()}
    return {
        "crt": crt,
        "images_per_s": args.batch_size * args.steps / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "warmup_s": warm_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "params_m": {n: round(v / 1e6, 2) for n, v in params.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 15 with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile every module (and the LPIPS network)")
    p.add_argument("--crt", choices=("both", "on", "off"), default="both")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--layout", choices=("auto", "nhwc", "nchw"), default="auto",
                   help="memory format; auto = the task's default (NHWC when compiled, NCHW in eager mode)")
    p.add_argument("--small", action="store_true", help="a small model (CPU smoke test), not the benchmark")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print the top ROWS ops of the timed loop")
    p.add_argument("--sync-debug", action="store_true", help="fail if the timed loop synchronizes with the GPU")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("override", nargs="*", help="extra config overrides, e.g. loss.adaptive_gan_weight=true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (15 if args.compile else 5)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch_size}, {args.image_size}px, "
          f"{args.precision}, compile={args.compile}, layout={args.layout}")
    results = []
    for crt in {"both": (False, True), "on": (True,), "off": (False,)}[args.crt]:
        r = measure(args, crt, device)
        results.append(r)
        print(f"  crt={'on ' if crt else 'off'}  {r['images_per_s']:8.1f} images/s  {r['step_ms']:8.1f} ms/step  "
              f"peak {r['peak_mem_gib']:.1f} GiB  warmup {r['warmup_s']:.0f}s  params(M) {r['params_m']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(results) == 2:
        overhead = results[1]["step_ms"] / results[0]["step_ms"] - 1
        print(f"  CRT overhead: {100 * overhead:+.1f}% step time (target <= +10%)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
