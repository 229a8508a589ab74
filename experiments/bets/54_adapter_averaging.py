"""Bet 54: averaging users' norm adapters destroys what each one learned (route, never average)."""
from __future__ import annotations

from sharedllm.bets.cells import head_to_head, per_user_ppl, values
from sharedllm.bets.harness import Bet, grade_users, main
from sharedllm.bets.probes import mean_state
from sharedllm.personalise import load_adapted

from .common import USERS

HYPOTHESIS = ("Each user's own norm adapter beats the element-wise mean of all users' norm adapters on that "
              "user's held-out text by >= 5 %.")
CRITERIA = {
    "margin": 0.05, "win": "own ppl <= (1 - margin) x average ppl", "loss": "average ppl < own ppl",
    "STRICT": {"min_users_won": 3}, "LENIENT": {"min_users_won": 2}, "CATASTROPHIC": {"min_users_lost": 2},
}


def run(ctx) -> list:
    paths = {user: ctx.adapter(rel, "norm") for user, rel in USERS.items()}
    states = [{n: p.detach() for n, p in load_adapted(ctx.base, path).params.items()} for path in paths.values()]
    avg = ctx.derived_adapter("norm_mean_of_" + "_".join(paths), "norm", mean_state(states))
    cells = []
    for user, rel in USERS.items():
        cells += ctx.score_cells(None, rel, user=user, condition="base")
        cells += ctx.score_cells(paths[user], rel, user=user, condition="own")
        cells += ctx.score_cells(avg, rel, user=user, condition="average")
    return cells


def counts(cells: list, criteria: dict) -> tuple[int, int]:
    return head_to_head(cells, criteria["margin"], "own", "average")


def verdict(cells: list, criteria: dict) -> str:
    return grade_users(*counts(cells, criteria), criteria)


def summary(cells: list) -> str:
    won, _ = counts(cells, CRITERIA)
    per = per_user_ppl(cells, ('base', 'own', 'average'))
    return f"own beats the average by >= 5 % for {won}/{len(values(cells, 'user'))} users; {per}"


BET = Bet(id="54", slug="adapter_averaging", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary)

if __name__ == "__main__":
    raise SystemExit(main(BET))
