"""sharedllm bet: run one pre-registered bet (experiments/bets/) and print its verdict."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SharedLLMError

HELP = "run a catalogue bet by id (13, 37, 46, 49, 52-55, 58, 60, 61, 63, scale_protocol); results are reused"


def bets_package():
    """experiments/bets lives beside src/ in a source checkout; make it importable."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "experiments" / "bets" / "harness.py").is_file():
        raise SharedLLMError(f"the bets live in a source checkout (experiments/bets/ beside src/); none at {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from experiments.bets import harness

    return harness


def configure(p) -> None:
    p.add_argument("id", help="bet id, e.g. 49 or scale_protocol")
    try:
        bets_package().add_options(p)
    except SharedLLMError:  # not a source checkout: the command reports it when run
        pass


def run(args) -> dict:
    harness = bets_package()
    return harness.run_bet(harness.get_bet(args.id), harness.options_from(args))


def render(result: dict) -> str:
    return bets_package().render(result)
