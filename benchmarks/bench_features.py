"""Feature-extraction throughput (images/s) of the metric feature networks.

    python benchmarks/bench_features.py                               # EffNet-Lite0, fp32 + bf16, bs 256
    python benchmarks/bench_features.py --network inception-v3 --weights pt_inception-2015-12-05-6726825d.pth
    python benchmarks/bench_features.py --precision bf16 --batch-size 512 --device cuda --channels-last

Input: random 256x256 images in [-1, 1] already on the device (data loading is not measured); the
network resizes them itself (224 for EffNet-Lite0 / DINOv2, 299 for Inception), which is included.
Timing: warm-up iterations, then `--iters` timed forward passes synchronised on the device; prints
the median and best throughput, plus the max |difference| of bf16 pool features against fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostage.backbones import load_feature_network  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bench(net, x: torch.Tensor, precision: str, iters: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    device = x.device
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for _ in range(warmup):
        with torch.autocast(**amp):
            out = net(x)
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        with torch.autocast(**amp):
            out = net(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    n = x.shape[0]
    return n / statistics.median(times), n / min(times), out["pool"].float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="effnet-lite0")
    ap.add_argument("--weights")
    ap.add_argument("--precision", default="both", choices=("fp32", "bf16", "both"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=256, help="input image size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmul/conv for fp32 on CUDA")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    net = load_feature_network(args.network, args.weights).to(device)
    x = torch.rand(args.batch_size, 3, args.size, args.size, device=device) * 2 - 1
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{net.name} on {name}, torch {torch.__version__}, {args.size}x{args.size} input -> {net.input_size}, "
          f"batch {args.batch_size}, channels_last={args.channels_last}, tf32={args.tf32}")
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    pools = {}
    for p in precisions:
        med, best, pools[p] = bench(net, x, p, args.iters, args.warmup)
        print(f"  {p}: {med:10.1f} images/s (median of {args.iters}), best {best:.1f}")
    if len(pools) == 2:
        diff = (pools["bf16"] - pools["fp32"]).abs()
        print(f"  bf16 vs fp32 pool features: max |diff| {diff.max():.4g}, "
              f"relative {diff.norm() / pools['fp32'].norm():.3g}")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
