"""A study's tokenizer training as the engine runs it (preset, real data loader), eager vs train.compile.

    python benchmarks/bench_tokenizer_run.py --preset vq_fmnist_f4 --steps 300                 # GPU
    python benchmarks/bench_tokenizer_run.py --preset vq_fmnist_f4 --steps 300 --processes 6   # 6 at once
    python benchmarks/bench_tokenizer_run.py --preset vq_fmnist_f4 --steps 450 --replicas 3     # 3 seeds, 1 process
    python benchmarks/bench_tokenizer_run.py --device cpu --steps 6 --compile off               # smoke test

benchmarks/bench_tokenizer.py times the ImageNet VQ-16 step in isolation; this one times what a claim
study's tokenizer job costs: `twostage tokenizer train PRESET` (no validation, no checkpoints in the
timed span), per-step wall time from the engine's `perf/step_time_s` averaged over the log windows after
the first (start-up and compilation out). With `--processes K` it starts K such runs at once (as a study
with --jobs-per-gpu K does) and reports the aggregate steps/s, to see how K processes share one GPU.
With `--replicas K` it trains K seeds as one joint run of stacked replicas in one process instead
(`twostage tokenizer train PRESET --out R1..RK --seeds ... --pack P`, twostage/engine/replicas.py) and
reports K / the joint step time as the aggregate: the same K runs, the other way to share the GPU.

With K > 1 every number comes from the *common window*: the wall-clock span in which all K runs were past
their first log window (compiled) and not yet finished, read from the rows' wall times in each run's
metrics.jsonl; each run's steps inside it are interpolated between its log rows. The K processes finish
compiling seconds apart, and a run that trains while the others still compile has the GPU to itself:
averaging each run's own step times (what this script did until 2026-12-02) then overstates the
aggregate, by up to 2x for 150-step runs (results/throughput/README.md §5). Use enough steps that the
common window is most of each run (the script prints its share).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_replicas import step_time  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def log_rows(run: Path) -> list[tuple[float, int]]:
    """(wall time, step) of each log row of a run's metrics.jsonl that has a step time."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["time"], r["step"]) for r in rows if "perf/step_time_s" in r and "time" in r]


def step_at(rows: list[tuple[float, int]], t: float) -> float:
    """A run's step count at wall time t, linear between its log rows (t inside the rows' span)."""
    for (t0, s0), (t1, s1) in zip(rows, rows[1:]):
        if t0 <= t <= t1:
            return s0 + (s1 - s0) * (t - t0) / (t1 - t0) if t1 > t0 else float(s1)
    raise ValueError(f"time {t} outside the run's log rows")


def common_window(runs: list[Path]) -> tuple[float, list[float], float]:
    """(window seconds, each run's steps in it, the window's share of the runs' mean timed span): the span
    in which every run was past its first log window and not finished."""
    rows = [log_rows(run) for run in runs]
    if any(len(r) < 3 for r in rows):
        raise SystemExit("each run needs at least 3 log rows with step times: raise --steps")
    start, end = max(r[1][0] for r in rows), min(r[-1][0] for r in rows)
    if end <= start:
        raise SystemExit("the runs did not train at the same time after compiling: raise --steps")
    steps = [step_at(r, end) - step_at(r, start) for r in rows]
    share = (end - start) / (sum(r[-1][0] - r[1][0] for r in rows) / len(rows))
    return end - start, steps, share


def overrides(args: argparse.Namespace, compile_: str, seed: int | None) -> list[str]:
    """The run's overrides; seed None: the replicas' seeds come from --seeds."""
    return [f"train.steps={args.steps}", f"train.log_every={max(1, args.steps // 6)}",
            f"train.ckpt_every={10 * args.steps}", "train.progress=false", "monitor.val_images=0",
            f"train.device={args.device}", f"train.compile={compile_}",
            *([f"train.seed={seed}"] if seed is not None else []), *args.override]


def commands(args: argparse.Namespace, mode: str, work: Path) -> tuple[list[list[str]], list[Path]]:
    """(one `twostage tokenizer train` command per process, the run folders whose metrics.jsonl time it)."""
    train = [sys.executable, "-m", "twostage", "tokenizer", "train", args.preset]
    if args.replicas > 1:
        outs = [str(work / f"{mode}_r{k}") for k in range(args.replicas)]
        pack = work / f"{mode}_pack"
        seeds = [str(k) for k in range(args.replicas)]
        return [[*train, *overrides(args, mode, None), "--out", *outs, "--seeds", *seeds, "--pack", str(pack)]], [pack]
    runs = [work / f"{mode}_{k}" for k in range(args.processes)]
    return [[*train, *overrides(args, mode, k), "--out", str(run)] for k, run in enumerate(runs)], runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vq_fmnist_f4")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--processes", type=int, default=1, help="runs started at once (each its own process)")
    p.add_argument("--replicas", type=int, default=1, help="K seeds as stacked replicas in one process instead")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("override", nargs="*", help="extra config overrides, e.g. loss.perceptual_size=64")
    args = p.parse_args(argv)

    import torch

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_tokenizer_run_"))
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    batch = None
    if args.replicas > 1 and args.processes > 1:
        p.error("--replicas K trains K seeds in one process: leave --processes at 1")
    how = f"{args.replicas} seeds stacked in 1 process" if args.replicas > 1 else f"{args.processes} process(es) at once"
    print(f"device {name}, torch {torch.__version__}, preset {args.preset}, {args.steps} steps per run, {how}, "
          f"date {time.strftime('%Y-%m-%d')}")
    print(f"{'compile':>7s} {'runs':>9s} {'step ms (mean of runs)':>22s} {'aggregate steps/s':>18s} "
          f"{'images/s':>9s} {'vs eager':>8s}")
    eager = None
    for mode in {"off": ["false"], "on": ["true"], "both": ["false", "true"]}[args.compile]:
        argvs, runs = commands(args, mode, work)
        procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for argv in argvs]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                print(err[-2000:], file=sys.stderr)
                return proc.returncode
        if batch is None:
            from twostage import api

            batch = api.load_config(work / f"{mode}_{'r0' if args.replicas > 1 else '0'}" / "config.yaml").train.batch_size
        if args.replicas > 1:  # one joint step trains every replica: each replica's step takes all of it
            times, note = [step_time(runs[0])] * args.replicas, "  (stacked replicas, one process)"
        elif len(runs) == 1:
            times, note = [step_time(runs[0])], ""
        else:  # only the span in which all of them trained (see the module docstring)
            window, steps, share = common_window(runs)
            times = [window / s for s in steps]
            note = f"  (common window {window:.1f} s, {100 * share:.0f}% of a run's timed span)"
        mean = sum(times) / len(times)
        aggregate = sum(1.0 / t for t in times)
        eager = eager or aggregate
        print(f"{mode:>7s} {max(args.processes, args.replicas):9d} {mean * 1e3:22.2f} {aggregate:18.2f} {aggregate * batch:9.0f} "
              f"{aggregate / eager:8.2f}{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
