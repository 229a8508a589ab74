"""The `sharedllm` command: each subcommand is one module in sharedllm.commands with
`configure(parser)` and `run(args) -> dict`; this file only parses, dispatches and prints.

`say` and `add_base_args` stay importable from here for research code (experiments/bets); the library's own
modules use sharedllm.log and sharedllm.commands.args."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__, log
from .commands.args import add_base_args  # noqa: F401  (re-exported: older callers import it from here)
from .errors import SharedLLMError
from .log import say  # noqa: F401  (re-exported: experiments/bets imports `say` from here)

SUBCOMMANDS = ["adapt", "eval", "inspect", "demo", "export", "quantize", "compress", "serve", "bet", "bets",
               "bases"]


def _load(name: str):
    try:
        return importlib.import_module(f"sharedllm.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"sharedllm.commands.{name}":
            return None
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="sharedllm", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"sharedllm {__version__}")
    add_verbosity_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in SUBCOMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP.replace("%", "%%"), description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        add_verbosity_args(p, argparse.SUPPRESS)
        mod.configure(p)
        modules[name] = mod
    return parser, modules


def add_verbosity_args(p: argparse.ArgumentParser, default=0) -> None:
    """-q / -v before or after the subcommand (the subcommand's copy does not overwrite the global one)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=log.QUIET, default=default,
                   help="warnings and errors only: no progress messages or bars")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=log.VERBOSE, default=default,
                   help="debug messages, and progress bars even when stderr is not a terminal")


def main(argv=None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = modules[args.command]
    try:
        with log.configured(args.verbosity, bars=not args.json):
            result = mod.run(args)
    except SharedLLMError as e:
        print(f"sharedllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sharedllm {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif hasattr(mod, "render"):
        print(mod.render(result))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
