"""Bet 60: a norm adapter trained on the user's text beats one trained on uniform random tokens."""
from __future__ import annotations

from sharedllm.bets.cells import head_to_head, per_user_ppl, values
from sharedllm.bets.harness import Bet, grade_users, main

from .common import USERS

HYPOTHESIS = ("Norm-only adapters learn the user, not just 'being fine-tuned': trained on the user's text they "
              "beat, by >= 5 % held-out ppl, the same method trained on uniform random tokens (same token count).")
CRITERIA = {
    "margin": 0.05, "win": "real ppl <= (1 - margin) x random ppl", "loss": "random ppl <= real ppl",
    "STRICT": {"min_users_won": 3}, "LENIENT": {"min_users_won": 2}, "CATASTROPHIC": {"min_users_lost": 2},
}


def run(ctx) -> list:
    cells = []
    for user, rel in USERS.items():
        real = ctx.adapter(rel, "norm")
        rand = ctx.adapter(rel, "norm", tag="_random", tokens=ctx.random_tokens(rel))
        ctx.curve(f"{user}/norm", real)
        ctx.curve(f"{user}/norm_random", rand)
        cells += ctx.score_cells(None, rel, user=user, condition="base")
        cells += ctx.score_cells(real, rel, user=user, condition="real")
        cells += ctx.score_cells(rand, rel, user=user, condition="random",
                                 random_tokens=len(ctx.data(rel).train))
    return cells


def counts(cells: list, criteria: dict) -> tuple[int, int]:
    return head_to_head(cells, criteria["margin"], "real", "random", ties_lose=True)


def verdict(cells: list, criteria: dict) -> str:
    return grade_users(*counts(cells, criteria), criteria)


def summary(cells: list) -> str:
    won, _ = counts(cells, CRITERIA)
    per = per_user_ppl(cells, ('base', 'real', 'random'))
    return f"real beats random by >= 5 % for {won}/{len(values(cells, 'user'))} users; {per}"


BET = Bet(id="60", slug="noise_floor", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary)

if __name__ == "__main__":
    raise SystemExit(main(BET))
