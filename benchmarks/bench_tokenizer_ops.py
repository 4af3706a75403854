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
- the model FLOPs of one training step split by component (appended after the lines above): encoder,
  quantizer, decoder, perceptual network, CRT predictor, discriminator and "other" (ops outside those
  modules), each as forward / no-grad forward / backward and as a share of the step, at the step counted
  above (500: before loss.disc_start, no discriminator) and at loss.disc_start (the discriminator's
  first step; counted at bench_study's batch and scaled), with the CPU time of each component's forward
  at --batch images. Attention products (scaled_dot_product_attention) are not counted on the CPU; the
  backward of the quantizer's entropy term (+CRT) counts as "other" (see component_flop_counter).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CRT = ["crt.enabled=true", "crt.ramp_steps=300", "model.entropy_weight=0.1"]  # study_crt's +CRT entry
FLOP_STEP = 500  # the step the TFLOP lines count: before loss.disc_start in the VQ presets

# Components of the FLOP breakdown: (label, [(owner, child)]), owner a key of task.modules or "perceptual"
# (task.perceptual), child an attribute of it (None: the whole module). The 1x1 convolutions around the
# quantizer go with the encoder (encode_latent) and the decoder (decode), as VQModel splits them.
COMPONENTS = (
    ("encoder", [("tokenizer", "encoder"), ("tokenizer", "quant_conv")]),
    ("quantizer", [("tokenizer", "quantizer")]),
    ("decoder", [("tokenizer", "post_quant_conv"), ("tokenizer", "decoder")]),
    ("perceptual network", [("perceptual", None)]),
    ("CRT predictor", [("crt", None)]),
    ("discriminator", [("disc", None)]),
)
PASSES = ("forward", "no-grad forward", "backward")


def component_modules(task: Any) -> dict[str, list[tuple[str, Any]]]:
    """label -> [(the module's name in FlopCounterMode's counts, the module)] for the components this task
    has. FlopCounterMode's module tracker names a top-level module by its class and a child by
    "<parent's name>.<attribute>"; the counted task is built inside bench_study's helper from the same
    config, so the names of this one match its."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for label, parts in COMPONENTS:
        for owner, child in parts:
            top = task.perceptual if owner == "perceptual" else task.modules.get(owner)
            if top is not None:
                name = type(top).__name__ + (f".{child}" if child else "")
                out.setdefault(label, []).append((name, getattr(top, child) if child else top))
    return out


def component_flop_counter(task: Any) -> Any:
    """A FlopCounterMode that also adds each op's FLOPs to one component and pass, in
    `.by_component[(label, pass)]`: the label of the component of `task` (component_modules) the op ran in,
    else "other"; the pass one of PASSES (the perceptual network's forward on the target runs under
    no_grad, the one on the reconstruction does not).

    get_flop_counts() alone would not do: it sums forward and backward, and in backward its module tracker
    keeps a module entered from when all of its outputs have gradients until its inputs have theirs, so
    modules that read one tensor (the perceptual network and the discriminator both read the
    reconstruction) are entered together and both get the ops of whichever runs its backward second.
    Here an op goes to the component entered last. An op on a module's output inside the module (the
    quantizer's entropy term reads its normalized latent, also an output) runs its backward before the
    tracker enters the module: it lands in "other".

    Overrides FlopCounterMode._count_flops (private, torch 2.x), the one place that sees both an op and the
    tracker's state; FlopCounterMode's own counts (get_flop_counts, get_total_flops) are kept as they are."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    labels = {module: label for label, parts in component_modules(task).items() for module, _ in parts}

    class ComponentFlopCounter(FlopCounterMode):
        def __init__(self) -> None:
            super().__init__(display=False)
            self.by_component: dict[tuple[str, str], int] = defaultdict(int)
            self._ops = 0
            self._entered: dict[str, int] = {}  # component module name -> the op at which it was first seen entered

        def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001, ANN202 - torch's signature
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                parents = set(self.mod_tracker.parents)
                for parent in parents:  # as FlopCounterMode counts
                    self.flop_counts[parent][func_packet] += flops
                self._ops += 1
                inside = parents & labels.keys()
                self._entered = {name: self._entered.get(name, self._ops) for name in inside}
                label = labels[max(inside, key=self._entered.__getitem__)] if inside else "other"
                kind = ("backward" if self.mod_tracker.is_bw else
                        "forward" if torch.is_grad_enabled() else "no-grad forward")
                self.by_component[(label, kind)] += flops
            return out

    return ComponentFlopCounter()


def component_forward_ms(task: Any, step: int, batch: int, repeats: int = 2) -> dict[str, float]:
    """label -> CPU milliseconds of the component's forward calls in one training step (every phase active at
    `step`, `batch` random images), timed by forward hooks (CPU ops run synchronously), averaged over
    `repeats` steps after a warm-up step."""
    import torch

    from twostage.engine.task import PhaseContext

    totals: dict[str, float] = defaultdict(float)
    timing = False  # off for the warm-up step
    handles = []
    for label, parts in component_modules(task).items():
        for _, module in parts:
            starts: list[float] = []  # start times of the calls in progress

            def start(module: Any, inputs: Any, starts: list[float] = starts) -> None:
                starts.append(time.perf_counter())

            def stop(module: Any, inputs: Any, output: Any, starts: list[float] = starts, label: str = label) -> None:
                elapsed = time.perf_counter() - starts.pop()
                if timing:
                    totals[label] += elapsed

            handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    size = task.cfg.data.image_size
    images = torch.rand(batch, task.cfg.model.in_channels, size, size) * 2 - 1
    try:
        for i in range(1 + repeats):
            timing = i > 0
            scratch: dict[str, Any] = {}
            for phase in task.phases():  # as bench_study's tokenizer_step_flops runs a step
                if phase.active(step):
                    ctx = PhaseContext((images, torch.zeros(batch, dtype=torch.long)), step, task.modules, scratch,
                                       torch.device("cpu"))
                    loss, _ = phase.loss(ctx)
                    loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {k: v / repeats * 1e3 for k, v in totals.items()}


def print_breakdown(title: str, counter: Any, scale: float, ms: dict[str, float], time_batch: int) -> None:
    """One breakdown table: GFLOP per component and pass (the counts x `scale`: to the training batch), the
    component's share of the step, and the CPU time of its forward calls (where it ran at this step)."""
    rows = {label: [counter.by_component.get((label, kind), 0) * scale / 1e9 for kind in PASSES]
            for label in [label for label, _ in COMPONENTS] + ["other"]}
    step = [sum(r[i] for r in rows.values()) for i in range(len(PASSES))]
    total = sum(step)
    print(title)
    print(f"  {'component':20s} {'forward':>9s} {'no-grad fwd':>11s} {'backward':>9s} {'total':>9s} {'share':>6s} "
          f"{'CPU fwd ms':>10s}  (GFLOP; CPU time at batch {time_batch})")
    for label, (fwd, nograd, bwd) in rows.items():
        t = f"{ms[label]:10.1f}" if label in ms and fwd + nograd > 0 else f"{'-':>10s}"
        print(f"  {label:20s} {fwd:9.2f} {nograd:11.2f} {bwd:9.2f} {fwd + nograd + bwd:9.2f} "
              f"{(fwd + nograd + bwd) / total:6.1%} {t}")
    print(f"  {'total':20s} {step[0]:9.2f} {step[1]:11.2f} {step[2]:9.2f} {total:9.2f} {1:6.1%}")


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

    from bench_study import TOKENIZER_FLOP_BATCH, tokenizer_step_flops  # benchmarks/ is on sys.path as a script

    counted: dict[str, tuple[Any, Any]] = {}  # config name -> (its task, its counter at FLOP_STEP): the breakdown
    for name, overrides in (("baseline", []), ("+CRT", CRT)):
        cfg = api.load_config(args.preset, overrides)
        batch = cfg.train.batch_size  # counted at the full batch: the check on bench_study's scaled count
        # The helper builds its own task; this one (perceptual loss on, as counted) names the components.
        task = VQTokenizerTask(api.load_config(args.preset, ["train.device=cpu", *overrides]))
        # A second counter around the helper sees the same ops (dispatch modes stack) and splits them up.
        with component_flop_counter(task) as counter:
            flops = tokenizer_step_flops("vq", cfg, step=FLOP_STEP, count_batch=batch)
        assert counter.get_total_flops() == flops, "the breakdown's counter missed ops of the helper's count"
        counted[name] = task, counter
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

    # The breakdown, after the lines above (their format is parsed elsewhere). The discriminator only runs
    # from loss.disc_start on (the GAN term in the autoencoder phase, and its own phase), so the step is
    # counted there too; bench_study counts a run at its middle step, which may fall on either side.
    for name, overrides in (("baseline", []), ("+CRT", CRT)):
        task, counter = counted[name]
        batch, disc_start = task.cfg.train.batch_size, task.cfg.loss.disc_start if "disc" in task.modules else None
        ms = component_forward_ms(task, FLOP_STEP if disc_start is None else max(disc_start, FLOP_STEP), args.batch)
        print_breakdown(f"FLOP breakdown, {name}, step {FLOP_STEP} (discriminator from step {disc_start}), "
                        f"batch {batch}:", counter, 1.0, ms, args.batch)
        if disc_start is not None and disc_start > FLOP_STEP:
            with component_flop_counter(task) as counter:
                tokenizer_step_flops("vq", api.load_config(args.preset, overrides), step=disc_start)
            print_breakdown(f"FLOP breakdown, {name}, step {disc_start} (discriminator on), batch {batch} "
                            f"(counted at {TOKENIZER_FLOP_BATCH}, scaled):", counter, batch / TOKENIZER_FLOP_BATCH,
                            ms, args.batch)
    print("(other: ops outside the components; with model.entropy_weight > 0 the backward of the quantizer's "
          "entropy term, which torch's module tracker places outside the quantizer. Attention products are "
          "not counted on the CPU.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
