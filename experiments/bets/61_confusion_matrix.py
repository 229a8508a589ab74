"""Bet 61: the confusion matrix: every user's norm adapter (and the bare base) on every user's held-out text."""
from __future__ import annotations

from pathlib import Path

from sharedllm.bets.cells import confusion_outcomes, fmt, ppl, values
from sharedllm.bets.harness import Bet, grade, main

from .common import USERS
from .figures import confusion_plot

HYPOTHESIS = ("Norm-only adapters are user-specific: on each user's held-out text their own adapter beats every "
              "other user's adapter and the bare base by >= 5 % ppl.")
CRITERIA = {
    "margin": 0.05, "win": "own ppl <= (1 - margin) x min(every other adapter's ppl, base ppl)",
    "STRICT": {"min_fraction_of_users_won": 1.0}, "LENIENT": {"min_fraction_of_users_won": 2 / 3},
    "CATASTROPHIC": {"max_fraction_of_users_own_best": 1 / 3},
}


def run(ctx) -> list:
    paths = {user: ctx.adapter(rel, "norm") for user, rel in USERS.items()}
    cells = []
    for adapter, path in [("base", None)] + list(paths.items()):
        for user, rel in USERS.items():
            cells += ctx.score_cells(path, rel, adapter=adapter, user=user)
        ctx.release()
    return cells


def confusion_verdict(outcomes: dict, criteria: dict) -> str:
    """Fractions of the users scored; fewer users than the bet declares (USERS) can never be STRICT."""
    n = len(outcomes)
    won = sum(w for w, _ in outcomes.values()) / n
    best = sum(b for _, b in outcomes.values()) / n
    eps = 1e-9
    return grade(won >= criteria["STRICT"]["min_fraction_of_users_won"] - eps and n >= len(USERS),
                 won >= criteria["LENIENT"]["min_fraction_of_users_won"] - eps,
                 best <= criteria["CATASTROPHIC"]["max_fraction_of_users_own_best"] + eps)


def verdict(cells: list, criteria: dict) -> str:
    return confusion_verdict(confusion_outcomes(cells, criteria["margin"]), criteria)


def matrix(cells: list) -> tuple[list, list, list]:
    """(adapters, users, ppl rows): the heatmap's data."""
    adapters, users = values(cells, "adapter"), values(cells, "user")
    return adapters, users, [[ppl(cells, adapter=a, user=u) for u in users] for a in adapters]


def summary(cells: list) -> str:
    out = confusion_outcomes(cells, CRITERIA["margin"])
    adapters, users, rows = matrix(cells)
    table = "; ".join(f"{a}: " + "/".join(fmt(x) for x in row) for a, row in zip(adapters, rows))
    return (f"own wins by >= 5 % for {sum(w for w, _ in out.values())}/{len(out)} users; ppl rows (adapter) x "
            f"columns ({'/'.join(users)}): {table}")


def plots(results: dict, folder: Path) -> list:
    """REPORT.md's heat map of the matrix."""
    r = results.get(BET.id)
    return [confusion_plot(r["cells"], r["bet"], folder / "confusion_matrix.png")] if r else []


BET = Bet(id="61", slug="confusion_matrix", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary)

if __name__ == "__main__":
    raise SystemExit(main(BET))
