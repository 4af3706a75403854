"""`twostage generator train | sample`, for every kind of stage-2 generator (twostage/registry.py).

    twostage generator train ar_fmnist_tiny --tokens caches/f8_train --val-tokens caches/f8_val --out runs/ar
    twostage generator train dit_fmnist --tokens caches/kl_train --out runs/dit     # --tokens: a latent cache
    twostage generator sample runs/ar_B --num 50000 --cfg 2.0 --out samples/ar_B.npz --compile

The config's `kind` (train) or the run's recorded kind (sample) picks the implementation through the
registry; this module only parses. Sampling options beyond the shared ones belong to some kinds
(GeneratorKind.options); giving one to a run of another kind is a config error naming who takes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# How `generator sample` draws class labels (outputs.sample_labels; the study spec's sample.labels). Here,
# not in outputs.py, because the CLI's parser and the study spec read it without importing torch.
LABEL_SAMPLING = ("balanced", "train")

# Flags of the kind-specific sampling options (registry.GeneratorKind.options), keyed by option name.
# Each is None unless given, so only options given on the command line reach the kind's sample_run.
KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "cfg_until": dict(type=int, help="sampling step after which CFG stops (default: the run's; never)"),
    "temperature": dict(type=float, help="softmax temperature; 0 is greedy (default: the run's)"),
    "top_k": dict(type=int, help="keep the k most likely tokens; 0 keeps all (default: the run's)"),
    "top_p": dict(type=float, help="nucleus sampling mass (default: the run's)"),
    "tokens_only": dict(action="store_true", default=None,
                        help="do not decode images (the npz holds tokens and labels)"),
    "steps": dict(type=int, help="ODE sampler steps (default: the run's)"),
    "sampler": dict(help="ODE sampler: euler or heun (default: the run's)"),
    "shift": dict(type=float, help="timestep shift (default: the run's)"),
    "cfg_interval": dict(type=float, nargs=2, metavar=("START", "END"),
                         help="guide only for t in [START, END], t = 1 is data (default: the run's)"),
}


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _takers(option: str) -> list[str]:
    from twostage import registry

    return [name for name, kind in registry.GENERATORS.items() if option in kind.options]


def register(subparsers: argparse._SubParsersAction) -> None:
    from twostage.engine.replicas import add_replica_options

    top = subparsers.add_parser("generator", help="train a stage-2 generator on a token/latent cache, sample from it",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="generator_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a generator (resumes automatically when RUN has a checkpoint)")
    p.add_argument("config", help="preset name in twostage/presets/ (e.g. ar_fmnist_tiny, dit_fmnist) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.size=L train.steps=1000")
    p.add_argument("--tokens", required=True, type=Path, nargs="+",
                   help="training cache (`twostage tokenizer encode`); with replicas, one per --out")
    p.add_argument("--val-tokens", type=Path, default=None, nargs="+",
                   help="validation cache (loss at checkpoints); with replicas, one per --out")
    add_replica_options(p, "run folder; several: replicas of one config trained as one (needs --seeds, --pack)")
    p.add_argument("--resume-with-changes", action="store_true",
                   help="resume RUN although optimizer / schedule settings changed (recorded in run.json)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("branch", help="the run of a shorter budget, cut from a longer run's checkpoint "
                                      "(constant schedules: the same run exactly)")
    p.add_argument("run", type=Path, help="generator run folder trained for more steps (with a checkpoint at --step)")
    p.add_argument("--step", type=int, required=True, help="the shorter run's train.steps")
    p.add_argument("--out", required=True, type=Path, help="new run folder")
    p.set_defaults(func=cmd_branch)

    p = sub.add_parser("sample", help="sample images (balanced labels by default) into an .npz (+ .json, .png grid)")
    p.add_argument("run", type=Path, help="generator run folder")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, type=Path, help="samples file (.npz)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's sample.cfg_scale); 1: no guidance, "
                        "0: unconditional, s: uncond + s * (cond - uncond)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"))
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer run (default: the one that made the cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16 applies on CUDA only")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (AR: CUDA graphs on GPU)")
    p.add_argument("--grid", type=int, default=64, help="samples in the PNG grid (0: none)")
    p.add_argument("--labels", default="balanced", choices=LABEL_SAMPLING,
                   help="class labels: balanced (equal counts per class; default) or train (the class proportions "
                        "of the run's training cache, for references with unequal classes, e.g. emoji)")
    for option, spec in KIND_OPTIONS.items():
        spec = {"default": None, **spec}
        spec["help"] = f"{', '.join(_takers(option))} runs: {spec['help']}"
        p.add_argument(_flag(option), dest=option, **spec)
    p.set_defaults(func=cmd_sample)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a generator of the config's kind into --out."""
    from twostage import api
    from twostage.config import ConfigError
    from twostage.engine.replicas import wants_replicas

    cfg = api.load_config(args.config, args.overrides, group="generator")
    if not wants_replicas(args):
        if len(args.tokens) > 1 or (args.val_tokens and len(args.val_tokens) > 1):
            raise ConfigError("one --out takes one --tokens and one --val-tokens (several: replicas, with --seeds "
                              "and --pack)")
        out = args.out[0]
        last = api.train_generator(cfg, args.tokens[0], out, val_cache=args.val_tokens[0] if args.val_tokens else None,
                                   resume_changes=args.resume_with_changes)
    else:
        k = len(args.out)
        tokens = args.tokens * k if len(args.tokens) == 1 else args.tokens  # one cache for every replica
        val = args.val_tokens * k if args.val_tokens and len(args.val_tokens) == 1 else args.val_tokens
        out = args.pack
        last = api.train_generator_replicas(cfg, tokens, args.out, args.seeds, args.pack, val_caches=val,
                                            resume_changes=args.resume_with_changes)
    shown = {k: round(v, 4) for k, v in last.items()
             if (k.endswith("loss") or k.startswith("perf/images")) and "_r" not in k}
    print(f"trained {out}: {shown}")
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    """Write the --step-step run of RUN's config into --out (twostage/generators/branch.py)."""
    from twostage import api

    out = api.branch_generator(args.run, args.step, args.out)
    print(f"branched {out} from {args.run} at step {args.step}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample from a trained generator run with the shared options and those of its kind."""
    from twostage import api, registry
    from twostage.config import ConfigError

    kind = registry.run_kind("generator", args.run)
    given = {option: vars(args)[option] for option in KIND_OPTIONS if vars(args)[option] is not None}
    for option in given:
        if option not in kind.options:
            takers = " and ".join(_takers(option)) or "no"
            own = ", ".join(_flag(o) for o in kind.options) or "none"
            raise ConfigError(f"{_flag(option)} is an option of {takers} generator runs; {args.run} is a "
                              f"{kind.name} run ({kind.summary}), whose own sampling options are: {own}")
    path = api.sample(
        args.run, args.num, args.out, cfg_scale=args.cfg, seed=args.seed, batch_size=args.batch_size,
        weights=args.weights, step=args.step, tokenizer=args.tokenizer, device=args.device,
        precision=args.precision, compile=args.compile, grid=args.grid, labels=args.labels, **given,
    )
    from twostage.engine.distributed import init_world

    if init_world().is_main:  # under torchrun rank 0 wrote the file and reports it
        print(f"wrote {args.num} samples to {path}")
    return 0
