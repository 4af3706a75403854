"""The `twostage` command. Each part of the package registers its own sub-commands here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterator

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
    "twostage.convert.commands",
]


# What a command's --out names, declared on its parser: `p.set_defaults(out_kind=OUT_FOLDER)` for a run,
# cache or study folder, OUT_FILE for a file it writes (samples .npz, PNG, JSON). main() checks a declared
# --out before the command runs (`out_problem`): a folder where a file exists, a file where a folder
# exists, a path under a file, a place this user cannot write. Commands without the marker are not checked.
OUT_FOLDER, OUT_FILE = "folder", "file"

# The markers of commands whose modules do not declare them yet (a module's own set_defaults wins).
OUT_KINDS = {
    "tokenizer train": OUT_FOLDER,
    "tokenizer encode": OUT_FOLDER,
    "tokenizer reconstruct": OUT_FILE,
    "tokenizer probe": OUT_FILE,
    "generator train": OUT_FOLDER,
    "generator branch": OUT_FOLDER,
    "generator sample": OUT_FILE,
    "eval gen": OUT_FILE,
    "eval recon": OUT_FILE,
    "eval stats": OUT_FILE,
    "study run": OUT_FOLDER,
    "study report": OUT_FOLDER,
    "study link-run": OUT_FOLDER,
    "demo": OUT_FOLDER,
}


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (command path, parser) of the tree, e.g. ("tokenizer train", <parser>)."""
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)parser that parsed `args`, e.g. the one of `twostage tokenizer train`."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def out_problem(out: str | Path, kind: str) -> str | None:
    """Why `out` cannot be this command's --out (a folder or a file to write), or None when it can."""
    out = Path(out).expanduser()
    try:
        return _out_problem(out, kind)
    except OSError as err:  # e.g. a folder above it that this user may not even look into
        return f"--out {out} cannot be used: {err.strerror or err}"


def _out_problem(out: Path, expected: str) -> str | None:
    if out.exists():
        if expected == OUT_FOLDER and not out.is_dir():
            return f"--out {out} is an existing file, but this command writes a folder there; give a folder path"
        if expected == OUT_FILE and out.is_dir():
            return f"--out {out} is a folder, but this command writes a file there; give a file path inside it"
        if not os.access(out, os.W_OK | (os.X_OK if expected == OUT_FOLDER else 0)):
            return f"--out {out} is not writable by this user; choose another {expected} or fix its permissions"
        if expected == OUT_FOLDER:
            return None
    # The nearest existing folder above must be a folder this user can create entries in.
    above = out.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"--out {out} lies under {above}, which is a file, not a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"--out {out} cannot be created: {above} is not writable by this user (read-only or permission denied)"
    return None


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
    for path, p in _parsers(parser):
        if path in OUT_KINDS and p.get_default("out_kind") is None:
            p.set_defaults(out_kind=OUT_KINDS[path])
    return parser


# A section.key=value config override (twostage/config.py), told apart from a path.
OVERRIDE_WORD = re.compile(r"[A-Za-z_][\w.]*=")


def overrides_out_of_path_lists(args: argparse.Namespace) -> None:
    """Options that take several paths (`--out R1 R2`, `--tokens C1 C2`: replicas) also take the overrides
    written after them (`--out runs/a model.codebook_size=64`): move those back to the overrides (a
    folder named like section.key=value cannot be given that way)."""
    for name, value in vars(args).items():
        if name == "overrides" or not isinstance(value, list) or not value or not isinstance(value[0], Path):
            continue
        words = [str(v) for v in value]
        moved = [w for w in words if OVERRIDE_WORD.match(w)]
        if moved:
            kept = [Path(w) for w in words if not OVERRIDE_WORD.match(w)]
            if not kept:
                raise ConfigError(f"--{name.replace('_', '-')} is followed by overrides only ({' '.join(moved)}); "
                                  f"give its path first")
            setattr(args, name, kept)
            args.overrides = [*args.overrides, *moved]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (section.key=value) may stand anywhere, also after options such as --out.
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes_overrides = hasattr(args, "overrides")
        unknown = [e for e in extra if not (takes_overrides and "=" in e and not e.startswith("-"))]
        if unknown:  # argparse's message and exit code 2, with the usage of the command that was meant
            chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "overrides"):
            overrides_out_of_path_lists(args)
        kind, out = getattr(args, "out_kind", None), getattr(args, "out", None)
        for one in (out if isinstance(out, list) else [out]):  # several --out: replicas (generator train)
            if kind is not None and one is not None and (problem := out_problem(one, kind)):
                raise UserError(problem)  # before any work: no data loaded, no model built
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
