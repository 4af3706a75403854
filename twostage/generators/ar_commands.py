"""The AR kind's `generator train` and `generator sample` (dispatched from commands.py)."""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from twostage import config as configlib
    from twostage.generators.ar.task import train_ar
    from twostage.generators.ar.config import ARRunConfig

    cfg = configlib.load(ARRunConfig, args.config, args.overrides)
    last = train_ar(cfg, args.tokens, args.out, val_tokens=args.val_tokens)
    shown = {k: round(v, 4) for k, v in last.items() if k.endswith("loss") or k.startswith("perf/images")}
    print(f"trained {args.out}: {shown}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from twostage.config import ConfigError
    from twostage.generators.ar.run import sample_ar_run

    for flag in ("steps", "sampler", "shift", "cfg_interval"):
        if getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to DiT runs; an AR run samples one token per "
                              "step and stops CFG with --cfg-until")

    path = sample_ar_run(
        args.run, args.num, args.out, cfg_scale=args.cfg, cfg_until=args.cfg_until, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, weights=args.weights,
        step=args.step, tokenizer=args.tokenizer, device=args.device, precision=args.precision,
        compile=args.compile, grid=args.grid, tokens_only=args.tokens_only,
    )
    print(f"wrote {args.num} samples to {path}")
    return 0
