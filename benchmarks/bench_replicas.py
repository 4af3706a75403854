"""What K stacked replicas of a generator cost against one run, measured in one process.

    python benchmarks/bench_replicas.py --sizes tiny small --replicas 1 4 16 --steps 300     # GPU
    python benchmarks/bench_replicas.py --device cpu --steps 20 --replicas 1 2                # smoke test
    python benchmarks/bench_replicas.py --sizes small --replicas 6 --compile both --steps 300  # eager vs compiled

For each size: a plain run (`generator train`, one model) and joint runs of K replicas
(`train_generator_replicas`, twostage/engine/replicas.py), all on one synthetic token cache with the
study's shape (64 tokens, codebook 1024, 10 classes; 20k images) and the preset's batch size, without
validation or sample grids. Printed per run: wall time of the training loop per step (the engine's
`perf/step_time_s`, averaged over log windows after the first, so start-up and the first window's
compilation are out), the cost of one replica-step relative to the plain run's step (the speed-up of
replicas is 1 / that), and the model-FLOP utilization against 790 TFLOP/s (dense bf16, H200).
`--compile both` runs every configuration eager and with train.compile (the plain run's model, the
replicas' vmapped loss) in the same process; "vs plain" is always against the eager plain run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16 = 790e12


def synthetic_cache(folder: Path, n: int = 20000, tokens: int = 64, codebook: int = 1024, classes: int = 10) -> Path:
    from twostage.data.cache_writer import write_arrays
    from twostage.data.token_cache import CacheMeta

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    side = int(tokens ** 0.5)
    data = rng.integers(0, codebook, (n, 2, tokens)).astype(np.uint16)
    meta = CacheMeta(kind="tokens", grid=(side, side), num_classes=classes, tokenizer_run="", tokenizer_checksum="bench",
                     split="train", codebook_size=codebook, image_size=32)
    return write_arrays(folder, meta, data, labels)


def step_time(run: Path) -> float:
    """Mean perf/step_time_s over the log windows after the first (metrics.jsonl of the engine)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
    return float(np.mean(times[1:] if len(times) > 1 else times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--replicas", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="train.compile for every run (on), or each configuration eager and compiled (both)")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    import torch

    from twostage import api

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_replicas_"))
    cache = synthetic_cache(work / "cache")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.steps} steps per run, date {time.strftime('%Y-%m-%d')}")
    print(f"{'size':6s} {'compile':>7s} {'replicas':>8s} {'step ms':>9s} {'ms/replica-step':>16s} {'vs plain':>9s} "
          f"{'MFU %':>7s}")
    modes = {"off": ["false"], "on": ["true"], "both": ["false", "true"]}[args.compile]
    for size in args.sizes:
        plain = None
        for mode in modes:
            common = [f"model.size={size}", f"train.steps={args.steps}", f"train.log_every={max(1, args.steps // 6)}",
                      f"train.ckpt_every={10 * args.steps}", "train.progress=false", f"train.device={device}",
                      "sample.grid_at_checkpoint=0", "train.num_workers=2", f"train.compile={mode}"]
            cfg = api.load_config("ar_fmnist_tiny", common)
            plain_dir = work / f"{size}_{mode}_plain"
            api.train_generator(cfg, cache, plain_dir)
            t = step_time(plain_dir)
            plain = plain or t  # the first mode's plain run (eager with --compile both)
            flops = json.loads((plain_dir / "model.json").read_text())["train_flops_per_step"]
            mfu = flops / t / PEAK_BF16 * 100 if device.startswith("cuda") else float("nan")
            print(f"{size:6s} {mode:>7s} {'plain':>8s} {t * 1e3:9.2f} {t * 1e3:16.2f} {t / plain:9.3f} {mfu:7.2f}")
            for k in args.replicas:
                folder = work / f"{size}_{mode}_k{k}"
                outs = [folder / f"r{i}" for i in range(k)]
                api.train_generator_replicas(cfg, [cache] * k, outs, list(range(k)), folder / "pack")
                t = step_time(folder / "pack")
                mfu = k * flops / t / PEAK_BF16 * 100 if device.startswith("cuda") else float("nan")
                print(f"{size:6s} {mode:>7s} {k:8d} {t * 1e3:9.2f} {t / k * 1e3:16.2f} {t / k / plain:9.3f} {mfu:7.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
