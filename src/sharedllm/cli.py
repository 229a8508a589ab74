"""The `sharedllm` command: each subcommand is one module in sharedllm.commands with
`configure(parser)` and `run(args) -> dict`; this file only parses, dispatches and prints."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__
from .errors import SharedLLMError

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in SUBCOMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP.replace("%", "%%"), description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        mod.configure(p)
        modules[name] = mod
    return parser, modules


def add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="default",
                   help="default (embedded SmolLM2-135M-Instruct) | a named base (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b; "
                        "`sharedllm bases`) | tiny | HF checkpoint DIR | ternary base FILE")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")


def main(argv=None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = modules[args.command]
    try:
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


def say(msg: str) -> None:
    """Progress narration goes to stderr so that --json output stays clean."""
    print(f"[sharedllm] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
