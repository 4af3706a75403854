"""The `twostage` command. Each part of the package registers its own sub-commands here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from twostage import __version__
from twostage.common.errors import UserError
from twostage.config import ConfigError

# Parts whose commands are complete. A part is listed only once its commands work end to end, so
# `twostage --help` never advertises something that fails.
COMMAND_MODULES = [
    "twostage.data.commands",
    "twostage.tokenizers.commands",
    "twostage.generators.commands",
    "twostage.metrics.commands",
    "twostage.study.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twostage",
        description="Two-stage image generation: tokenizers, generators and their trade-off.",
    )
    parser.add_argument("--version", action="version", version=f"twostage {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (section.key=value) may stand anywhere, also after options such as --out.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ConfigError as err:  # nothing ran: the command line or config file needs a change
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (UserError, FileExistsError, FileNotFoundError) as err:  # data, run folder or cache: one line, no traceback
        print(f"{args.command} error: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
