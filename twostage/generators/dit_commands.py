"""The DiT kind's `generator train` and `generator sample` (dispatched from commands.py by `kind: dit`).

    twostage generator train dit_fmnist --tokens caches/kl_train --val-tokens caches/kl_val --out runs/dit
    twostage generator sample runs/dit --num 10000 --cfg 1.5 --out samples/dit.npz

`--tokens` names the latent cache (written by twostage.tokenizers.kl.run.encode_latents). Sampling
settings the shared parser does not define (--steps, --sampler, --shift, --cfg-interval START END)
are read from `args` when present, else from the run's `sample:` config.
"""

from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from twostage import config as configlib
    from twostage.generators.dit.config import DiTRunConfig
    from twostage.generators.dit.run import train_dit

    cfg = configlib.load(DiTRunConfig, args.config, args.overrides)
    last = train_dit(cfg, args.tokens, args.out, val_cache=getattr(args, "val_tokens", None))
    shown = {k: round(v, 4) for k, v in last.items() if k.endswith("loss") or k.startswith("perf/images")}
    print(f"trained {args.out}: {shown}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from twostage.config import ConfigError
    from twostage.generators.dit.run import sample_dit

    if getattr(args, "tokens_only", False):
        raise ConfigError("--tokens-only does not apply to a DiT run: its samples are always decoded")
    if getattr(args, "cfg_until", None) is not None:
        raise ConfigError("--cfg-until is the AR generator's; a DiT run takes --cfg-interval START END (t = 1 is data)")
    interval = getattr(args, "cfg_interval", None)
    path = sample_dit(
        args.run, args.num, args.out, cfg_scale=args.cfg, steps=getattr(args, "steps", None),
        sampler=getattr(args, "sampler", None), shift=getattr(args, "shift", None),
        cfg_interval=tuple(interval) if interval is not None else None, seed=args.seed, batch_size=args.batch_size,
        weights=args.weights, step=args.step, tokenizer=args.tokenizer, device=args.device,
        precision=args.precision, compile=args.compile, grid=args.grid,
    )
    print(f"wrote {args.num} samples to {path}")
    return 0
