"""The CPU side of a study's tokenizer step: how many ops one autoencoder step runs, and what a batch costs.

    python benchmarks/bench_tokenizer_ops.py                   # vq_fmnist_f4 without / with CRT, batch 32
    python benchmarks/bench_tokenizer_ops.py --batch 128 --keep-perceptual

Two numbers that do not need a GPU, for reading a GPU profile of six tokenizer jobs sharing one GPU:
- ops per autoencoder step (forward + backward, torch.profiler on the CPU, counted once after a warm-up
  step) for the baseline and the +CRT configuration of study_crt (crt.enabled, the quantizer's entropy
  term), with the perceptual loss off by default so that the difference is the CRT arm's own. On a GPU
  whose processes take turns, each op is at least one kernel launch.
- model FLOPs per training step (forward + backward, torch.utils.flop_counter, perceptual loss on, at
  the preset's batch size): the arithmetic a GPU profile's step time is measured against.
- the training data loader's cost per batch in the main process (the preset's Fashion-MNIST pipeline,
  no workers): what a job's data loading asks of the host CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CRT = ["crt.enabled=true", "crt.ramp_steps=300", "model.entropy_weight=0.1"]  # study_crt's +CRT entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vq_fmnist_f4")
    p.add_argument("--batch", type=int, default=32, help="images per step for the op count")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-perceptual", action="store_true", help="count the perceptual network's ops too")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from twostage import api
    from twostage.data.build import build_dataset
    from twostage.data.train_loader import build_loader
    from twostage.engine.task import PhaseContext
    from twostage.tokenizers.vq.task import VQTokenizerTask

    torch.set_num_threads(args.threads)
    print(f"{args.preset}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
          f"date {time.strftime('%Y-%m-%d')}")
    extra = [] if args.keep_perceptual else ["loss.perceptual_weight=0"]
    x = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    for name, overrides in (("baseline", []), ("+CRT", CRT)):
        task = VQTokenizerTask(api.load_config(args.preset, ["train.device=cpu", *extra, *overrides]))

        def step():
            ctx = PhaseContext((x, torch.zeros(args.batch, dtype=torch.long)), 5, task.modules, {}, torch.device("cpu"))
            loss, _ = task.autoencoder_loss(ctx)
            loss.backward()

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = sum(e.count for e in prof.key_averages())
        start = time.perf_counter()
        for _ in range(3):
            step()
        print(f"{name:9s} {ops:6d} ops per step, {(time.perf_counter() - start) / 3 * 1e3:7.0f} ms per step on the CPU")

    from bench_study import tokenizer_step_flops  # benchmarks/ is on sys.path when run as a script

    for name, overrides in (("baseline", []), ("+CRT", CRT)):
        cfg = api.load_config(args.preset, overrides)
        batch = cfg.train.batch_size  # counted at the full batch: the check on bench_study's scaled count
        flops = tokenizer_step_flops("vq", cfg, step=500, count_batch=batch)
        print(f"{name:9s} {flops / 1e12:6.3f} TFLOP per training step (batch {batch}, "
              "forward + backward, perceptual loss on)")

    cfg = api.load_config(args.preset)
    loader = build_loader(build_dataset(cfg.data, "train"), batch_size=cfg.train.batch_size, seed=0, num_workers=0,
                          device=torch.device("cpu"), rank=0, world_size=1, on_device=None)
    next(loader)
    start = time.perf_counter()
    for _ in range(50):
        next(loader)
    print(f"data loader: {(time.perf_counter() - start) / 50 * 1e3:.1f} ms per batch of {cfg.train.batch_size} "
          "in the main process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
