"""Bet 55: a user's own adapter beats an ensemble of the other users' adapters (probabilities averaged)."""
from __future__ import annotations

from sharedllm.bets.cells import head_to_head, per_user_ppl, scored, values
from sharedllm.bets.harness import Bet, grade_users, main
from sharedllm.bets.probes import ensemble_nll

from .common import USERS

HYPOTHESIS = ("For each user, their own norm adapter beats, by >= 5 % held-out ppl, the ensemble that averages "
              "the next-token probabilities of every other user's norm adapter (their own left out).")
CRITERIA = {
    "margin": 0.05, "win": "own ppl <= (1 - margin) x ensemble ppl", "loss": "ensemble ppl < own ppl",
    "STRICT": {"min_users_won": 3}, "LENIENT": {"min_users_won": 2}, "CATASTROPHIC": {"min_users_lost": 2},
}


def run(ctx) -> list:
    from sharedllm.personalise import load_adapted

    paths = {user: ctx.adapter(rel, "norm") for user, rel in USERS.items()}
    cells = []
    for user, rel in USERS.items():
        cells += ctx.score_cells(None, rel, user=user, condition="base")
        cells += ctx.score_cells(paths[user], rel, user=user, condition="own")
        others = [u for u in paths if u != user]
        models = [load_adapted(ctx.base, paths[u]).model for u in others]
        for i, text in enumerate(ctx.texts(rel)):
            w = ctx.windows(text)
            with ctx.autocast():  # --dtype: the ensemble is scored in the dtype of every other cell
                nll = ensemble_nll(models, w)
            cells.append(scored(nll, int(w[:, 1:].numel()), text=i, user=user, condition="ensemble",
                                members="+".join(others)))
        del models
    return cells


def counts(cells: list, criteria: dict) -> tuple[int, int]:
    return head_to_head(cells, criteria["margin"], "own", "ensemble")


def verdict(cells: list, criteria: dict) -> str:
    return grade_users(*counts(cells, criteria), criteria)


def summary(cells: list) -> str:
    won, _ = counts(cells, CRITERIA)
    per = per_user_ppl(cells, ('base', 'own', 'ensemble'))
    return f"own beats the others' ensemble by >= 5 % for {won}/{len(values(cells, 'user'))} users; {per}"


BET = Bet(id="55", slug="logit_ensemble", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary)

if __name__ == "__main__":
    raise SystemExit(main(BET))
