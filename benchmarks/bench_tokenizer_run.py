"""A study's tokenizer training as the engine runs it (preset, real data loader), eager vs train.compile.

    python benchmarks/bench_tokenizer_run.py --preset vq_fmnist_f4 --steps 300                 # GPU
    python benchmarks/bench_tokenizer_run.py --preset vq_fmnist_f4 --steps 300 --processes 6   # 6 at once
    python benchmarks/bench_tokenizer_run.py --device cpu --steps 6 --compile off               # smoke test

benchmarks/bench_tokenizer.py times the ImageNet VQ-16 step in isolation; this one times what a claim
study's tokenizer job costs: `twostage tokenizer train PRESET` (no validation, no checkpoints in the
timed span), per-step wall time from the engine's `perf/step_time_s` averaged over the log windows after
the first (start-up and compilation out). With `--processes K` it starts K such runs at once (as a study
with --jobs-per-gpu K does) and reports the aggregate steps/s, to see how K processes share one GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_replicas import step_time  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def overrides(args: argparse.Namespace, compile_: str, seed: int) -> list[str]:
    return [f"train.steps={args.steps}", f"train.log_every={max(1, args.steps // 6)}",
            f"train.ckpt_every={10 * args.steps}", "train.progress=false", "monitor.val_images=0",
            f"train.device={args.device}", f"train.compile={compile_}", f"train.seed={seed}", *args.override]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vq_fmnist_f4")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--processes", type=int, default=1, help="runs started at once (each its own process)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("override", nargs="*", help="extra config overrides, e.g. loss.perceptual_size=64")
    args = p.parse_args(argv)

    import torch

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_tokenizer_run_"))
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    batch = None
    print(f"device {name}, torch {torch.__version__}, preset {args.preset}, {args.steps} steps per run, "
          f"{args.processes} process(es) at once, date {time.strftime('%Y-%m-%d')}")
    print(f"{'compile':>7s} {'processes':>9s} {'step ms (mean of runs)':>22s} {'aggregate steps/s':>18s} "
          f"{'images/s':>9s} {'vs eager':>8s}")
    eager = None
    for mode in {"off": ["false"], "on": ["true"], "both": ["false", "true"]}[args.compile]:
        runs = [work / f"{mode}_{k}" for k in range(args.processes)]
        procs = [subprocess.Popen([sys.executable, "-m", "twostage", "tokenizer", "train", args.preset,
                                   *overrides(args, mode, k), "--out", str(run)], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k, run in enumerate(runs)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                print(err[-2000:], file=sys.stderr)
                return proc.returncode
        times = [step_time(run) for run in runs]
        if batch is None:
            from twostage import api

            batch = api.load_config(runs[0] / "config.yaml").train.batch_size
        mean = sum(times) / len(times)
        aggregate = sum(1.0 / t for t in times)
        eager = eager or aggregate
        print(f"{mode:>7s} {args.processes:9d} {mean * 1e3:22.2f} {aggregate:18.2f} {aggregate * batch:9.0f} "
              f"{aggregate / eager:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
