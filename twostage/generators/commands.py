"""`twostage generator train | sample`, for every kind of stage-2 generator.

    twostage generator train ar_fmnist_tiny --tokens caches/f8_train --val-tokens caches/f8_val --out runs/ar
    twostage generator train ar_imagenet_B train.steps=100000 --tokens caches/in256 --out runs/ar_B
    twostage generator sample runs/ar_B --num 50000 --cfg 2.0 --out samples/ar_B.npz --compile

The config's (or run's) `kind` picks the implementation: `ar` (discrete tokens, LlamaGen GPT) or `dit`
(continuous latents, LightningDiT; --tokens then names the latent cache). Each
kind provides `train(cfg_source, overrides, args)` and `sample(args)` in its own module, so a new
kind (e.g. a masked generator) only adds an entry to KINDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# kind -> module providing cmd_train(args) and cmd_sample(args)
KINDS = {"ar": "twostage.generators.ar_commands", "dit": "twostage.generators.dit_commands"}


def register(subparsers: argparse._SubParsersAction) -> None:
    top = subparsers.add_parser("generator", help="train a stage-2 generator on a token/latent cache, sample from it",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="generator_command", metavar="ACTION", required=True)

    p = sub.add_parser("train", help="train a generator (resumes automatically when RUN has a checkpoint)")
    p.add_argument("config", help="preset name in twostage/presets/ (e.g. ar_fmnist_tiny) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.size=L train.steps=1000")
    p.add_argument("--tokens", required=True, type=Path, help="training cache (`twostage tokenizer encode`)")
    p.add_argument("--val-tokens", type=Path, default=None, help="validation cache (loss per position at checkpoints)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.set_defaults(func=_guard(cmd_train))

    p = sub.add_parser("sample", help="sample images with balanced labels into an .npz (+ .json, .png grid)")
    p.add_argument("run", type=Path, help="generator run folder")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, type=Path, help="samples file (.npz)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the run's sample.cfg_scale; 1 or 0: none)")
    p.add_argument("--cfg-until", type=int, default=None, help="step after which CFG stops (default: never)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0 keeps all tokens")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"))
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer run (default: the one that made the cache)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16 applies on CUDA only")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step (CUDA graphs on GPU)")
    p.add_argument("--grid", type=int, default=64, help="samples in the PNG grid (0: none)")
    p.add_argument("--tokens-only", action="store_true", help="do not decode images (npz holds tokens and labels; AR)")
    # continuous (DiT) runs only; the AR kind refuses them
    p.add_argument("--steps", type=int, default=None, help="DiT: sampler steps (default: the run's)")
    p.add_argument("--sampler", default=None, help="DiT: euler or heun (default: the run's)")
    p.add_argument("--shift", type=float, default=None, help="DiT: timestep shift (default: the run's)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="DiT: guide only for t in [START, END] (t = 1 is data)")
    p.set_defaults(func=_guard(cmd_sample))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected problems (missing cache, run, checkpoint) as one message instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        from twostage.common.errors import UserError
        from twostage.config import ConfigError
        from twostage.data.token_cache import TokenCacheError
        from twostage.engine.checkpoint import CheckpointError
        from twostage.generators.outputs import RunLoadError
        from twostage.tokenizers.vq.tokenizer import TokenizerLoadError

        try:
            return fn(args)
        except ConfigError:
            raise  # the top-level CLI prints config errors
        except (TokenCacheError, CheckpointError, RunLoadError, TokenizerLoadError, FileNotFoundError, UserError) as err:
            print(f"generator error: {err}", file=sys.stderr)
            return 1

    run.__doc__ = fn.__doc__
    return run


def _kind_module(kind: str, where: str):
    from twostage.config import ConfigError

    if kind not in KINDS:
        raise ConfigError(f"{where}: kind={kind!r} is not a generator kind; choose one of {sorted(KINDS)}")
    return importlib.import_module(KINDS[kind])


def config_kind(source: str | Path, overrides: list[str]) -> str:
    """The `kind` of a config file or preset (an override kind=... wins); default "ar"."""
    from twostage import registry

    return registry.source_kind("generator", source, overrides)


def run_kind(run_dir: Path) -> str:
    from twostage import registry

    return registry.run_kind("generator", run_dir).name


def cmd_train(args: argparse.Namespace) -> int:
    """Train a generator of the config's kind into --out."""
    kind = config_kind(args.config, args.overrides)
    return _kind_module(kind, str(args.config)).cmd_train(args)


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample from a trained generator run."""
    kind = run_kind(args.run)
    return _kind_module(kind, f"{args.run}/config.yaml").cmd_sample(args)
