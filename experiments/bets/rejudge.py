"""Re-judge a committed result under its module's current version, without re-running it.

For a bet whose criteria were re-registered after its run (e.g. bet 13 v2: the development text left out of the
judgement): the cells stay byte for byte as committed; version, criteria, verdict, summary and side / control
verdicts are replaced by the module's, and meta.rejudged records what was there before and why.

    python -m experiments.bets.rejudge 13 --why "text 0 was the development text"
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sharedllm.atomic import write_text_atomic
from sharedllm.bets.harness import get_bet


def rejudge(result: dict, why: str, today: str | None = None) -> dict:
    """A new result dict: same cells, config and meta, judged by the module's current version."""
    bet = get_bet(result["bet"])
    if result["version"] == bet.version:
        raise ValueError(f"bet {bet.name}: the result is already version {bet.version}; nothing to re-judge")
    cells, criteria = result["cells"], json.loads(json.dumps(bet.criteria))
    out = {**result, "version": bet.version, "criteria": criteria, "verdict": bet.verdict(cells, criteria),
           "summary": bet.summary(cells)}
    if bet.side_verdicts is not None:
        out["side_verdicts"] = bet.side_verdicts(cells, criteria)
    if bet.controls is not None:
        out["control_verdicts"] = bet.controls(cells, criteria)
    before = {"date": today or time.strftime("%Y-%m-%d"), "from_version": result["version"],
              "from_verdict": result["verdict"], "from_criteria": result["criteria"], "why": why}
    out["meta"] = {**result["meta"], "rejudged": [*result["meta"].get("rejudged", []), before]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bets.rejudge", description=__doc__)
    p.add_argument("bet")
    p.add_argument("--why", required=True, help="the reason recorded in meta.rejudged")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    path = Path(args.results) / f"{get_bet(args.bet).name}.json"
    old = json.loads(path.read_text())
    new = rejudge(old, args.why)
    assert new["cells"] == old["cells"]
    write_text_atomic(path, json.dumps(new, indent=1, default=float) + "\n")
    print(f"{path}: version {old['version']} {old['verdict']} -> version {new['version']} {new['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
