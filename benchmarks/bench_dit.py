"""LightningDiT training throughput and MFU: LightningDiT-B/1 on 16x16x32 latents, batch 256, bf16.

One timed step is the engine's training step for `DiTTask` (twostage/engine/trainer.py `_run_phase`):
latent normalization, label dropout, logit-normal t, x_t, forward under bf16 autocast (SDPA attention:
flash kernels), MSE + velocity-direction loss, backward, grad-norm clipping, fused AdamW step and the
fp32 EMA update. Synthetic latents stay on the device, so the loader is not measured.

MFU counts 6 * N * T + 12 * L * T^2 * W FLOPs per trained image (N non-embedding parameters, T tokens,
L layers, W width: the parameter rule plus attention scores, forward + backward) against 750 TFLOP/s
(the figure of the issue; the measured dense bf16 matmul peak of an H100 SXM is ~800). With this rule
the public LightningDiT implementation's 2150 images/s for B/1 is MFU 0.59. `model_tflops` also prints
the FLOPs of the matmuls actually run (AdaLN modulation is per image, not per token, so it is cheaper
than the parameter rule says).

    python benchmarks/bench_dit.py --compile                  # the target: >= 2600 images/s on an H100
    python benchmarks/bench_dit.py                            # eager
    python benchmarks/bench_dit.py --small --device cpu --steps 2   # CPU smoke test
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
from twostage.engine.ema import EMA  # noqa: E402
from twostage.engine.optim import build_optimizer  # noqa: E402
from twostage.engine.task import PhaseContext  # noqa: E402
from twostage.generators.dit.config import DiTRunConfig  # noqa: E402
from twostage.generators.dit.task import DiTTask, LatentSpace  # noqa: E402

PEAK_TFLOPS = 750.0


def train_flops_per_image(model) -> tuple[float, float]:
    """(parameter-rule FLOPs, matmul FLOPs) of one training image (forward + backward = 3 x forward).

    The matmul count is the model's own (LightningDiT.flops_per_token, the study's convention); the
    rule counts the per-image AdaLN and timestep layers per token, as public MFU figures do.
    """
    layers, width = len(model.blocks), model.width
    tokens = model.tokens_grid[0] * model.tokens_grid[1]
    attn_scores = 2 * 2 * tokens * tokens * width * layers  # QK^T and AV, forward
    rule = 6 * model.param_counts()["non_embedding"] * tokens + 3 * attn_scores
    return float(rule), float(model.flops_per_token()["train_per_image"])


def build(args: argparse.Namespace, device: torch.device):
    overrides = [f"model.size={args.size}", f"model.patch_size={args.patch}", f"train.batch_size={args.batch_size}",
                 f"train.device={device}", f"model.qk_norm={str(args.qk_norm).lower()}"] + args.override
    cfg = configlib.load(DiTRunConfig, None, overrides)
    space = LatentSpace(channels=args.channels, grid=(args.grid, args.grid), num_classes=1000,
                        latent_mean=[0.1] * args.channels, latent_std=[1.5] * args.channels)
    torch.manual_seed(0)
    task = DiTTask(cfg, space)
    model = task.modules["dit"].to(device).train()
    ema = EMA({"dit": model}, cfg.train.ema_decay) if not args.no_ema else None
    if args.compile:
        model.compile()  # in place, as the engine does with train.compile=true
    spec = task.optimizers()["dit"]
    opt = build_optimizer([model], spec.config, device)
    return task, model, opt, spec.config, ema


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    task, model, opt, ocfg, ema = build(args, device)
    phase = task.phases()[0]
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, args.channels, args.grid, args.grid)
    batches = [(torch.randn(shape, device=device, generator=gen),
                torch.randint(0, 1000, (args.batch_size,), device=device, generator=gen)) for _ in range(4)]
    params = [p for g in opt.param_groups for p in g["params"]]

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = phase.loss(PhaseContext(batches[i % 4], i, task.modules, {}, device))
        loss.backward()
        if ocfg.grad_clip is not None and not args.no_clip:
            torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
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
    times = []
    for rep in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(args.warmup + rep * args.steps + i)
        sync()
        times.append(time.perf_counter() - t0)
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile))
    elapsed = sorted(times)[len(times) // 2]  # median of the repeats
    ips = args.batch_size * args.steps / elapsed
    rule, matmul = train_flops_per_image(model)
    return {
        "images_per_s": ips,
        "step_ms": 1000 * elapsed / args.steps,
        "repeats_images_per_s": [args.batch_size * args.steps / t for t in times],
        "mfu": ips * rule / (PEAK_TFLOPS * 1e12),
        "tflops_rule": ips * rule / 1e12,
        "model_tflops": ips * matmul / 1e12,
        "gflop_per_image_rule": rule / 1e9,
        "warmup_s": warm_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="B")
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 10 with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile=true)")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--sdpa", choices=("auto", "flash", "cudnn", "efficient"), default="auto",
                   help="restrict scaled_dot_product_attention to one backend (default: PyTorch's choice)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--small", action="store_true", help="tiny model, 4x4 grid, batch 4 (CPU smoke test)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print the top ROWS ops of the timed loop")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("override", nargs="*", help="extra DiTRunConfig overrides, e.g. flow.direction_weight=0")
    args = p.parse_args(argv)
    if args.small:
        args.size, args.grid, args.batch_size, args.channels = "tiny", 4, 4, 4
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (10 if args.compile else 5)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, LightningDiT-{args.size}/{args.patch} on "
          f"{args.grid}x{args.grid}x{args.channels} latents, batch {args.batch_size}, {args.precision}, "
          f"compile={args.compile}, ema={not args.no_ema}, clip={not args.no_clip}, sdpa={args.sdpa}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    with sdpa_kernel(backends[args.sdpa]) if args.sdpa != "auto" else contextlib.nullcontext():
        r = measure(args, device)
    print(f"  {r['images_per_s']:8.1f} images/s  {r['step_ms']:7.1f} ms/step  MFU {r['mfu']:.3f} "
          f"(vs {PEAK_TFLOPS:.0f} TFLOP/s; {r['gflop_per_image_rule']:.1f} GFLOP/image)  "
          f"matmul {r['model_tflops']:.0f} TFLOP/s  peak {r['peak_mem_gib']:.1f} GiB  warmup {r['warmup_s']:.0f}s  "
          f"params {r['params_m']}M  repeats {[round(x) for x in r['repeats_images_per_s']]}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": r}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
