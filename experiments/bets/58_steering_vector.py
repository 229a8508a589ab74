"""Bet 58: one learned steering vector on the residual stream vs norm-only adapters."""
from __future__ import annotations

from sharedllm.bets.cells import fmt, ppl, values
from sharedllm.bets.harness import Bet, grade, main

from .common import USERS

HYPOTHESIS = ("A single learned vector added to the residual stream after the last block (the `steer` method, "
              "hidden-size parameters) personalises better than norm-only adapters at the same budget.")
CRITERIA = {
    "win": "steer ppl < norm ppl on the user's held-out eval texts (pooled)",
    "STRICT": {"min_users_won": 3}, "LENIENT": {"min_users_won": 2}, "CATASTROPHIC": {"max_users_won": 0},
}


def run(ctx) -> list:
    cells = []
    for user, rel in USERS.items():
        cells += ctx.score_cells(None, rel, user=user, method="none", bytes=0)
        for method in ("norm", "steer"):
            path = ctx.adapter(rel, method)
            ctx.curve(f"{user}/{method}", path)
            cells += ctx.score_cells(path, rel, user=user, method=method, bytes=path.stat().st_size)
            ctx.release()
    return cells


def won(cells: list) -> int:
    return sum(ppl(cells, user=u, method="steer") < ppl(cells, user=u, method="norm")
               for u in values(cells, "user"))


def verdict(cells: list, criteria: dict) -> str:
    k = won(cells)
    return grade(k >= criteria["STRICT"]["min_users_won"], k >= criteria["LENIENT"]["min_users_won"],
                 k <= criteria["CATASTROPHIC"]["max_users_won"])


def summary(cells: list) -> str:
    per = "; ".join(f"{u} base/norm/steer {'/'.join(fmt(ppl(cells, user=u, method=m)) for m in ('none', 'norm', 'steer'))}"
                    for u in values(cells, "user"))
    return f"steer beats norm for {won(cells)}/{len(values(cells, 'user'))} users; {per}"


BET = Bet(id="58", slug="steering_vector", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary)

if __name__ == "__main__":
    raise SystemExit(main(BET))
