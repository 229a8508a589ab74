"""Bet 52: norm-only adapters trained on the ternary base recover much of its loss for each user."""
from __future__ import annotations

from sharedllm.base import load_base
from sharedllm.bets.cells import fmt, ppl, select, values
from sharedllm.bets.harness import Bet, grade, main, not_run

from .common import USERS

HYPOTHESIS = ("A norm-only adapter trained on the ternary base (same budget as on the fp base) improves each "
              "user's held-out ppl by >= 30 % over the bare ternary base.")
CRITERIA = {
    "improvement": "1 - (ternary + norm adapter ppl) / (ternary base ppl), user's 3 eval texts pooled",
    "STRICT": {"min_improvement": 0.30, "min_users": 3}, "LENIENT": {"min_improvement": 0.15, "min_users": 2},
    "CATASTROPHIC": {"no_improvement_on_any_user": True},
}


def run(ctx) -> list:
    tbase = load_base(str(ctx.ternary_file()), ctx.opts.device)
    tctx = ctx.rebased(tbase)
    cells = []
    for user, rel in USERS.items():
        cells += ctx.score_cells(None, rel, user=user, condition="fp_base")
        cells += tctx.score_cells(None, rel, user=user, condition="ternary_base")
        path = tctx.adapter(rel, "norm")
        tctx.curve(f"{user}/norm_on_ternary", path)
        cells += tctx.score_cells(path, rel, user=user, condition="ternary_norm")
        rand = tctx.adapter(rel, "norm", tag="_random", tokens=tctx.random_tokens(rel))  # the control
        cells += tctx.score_cells(rand, rel, user=user, condition="ternary_random")
        tctx.release()
    ctx.notes["ternary_fingerprint"] = tbase.fingerprint
    return cells


def improvements(cells: list, mine: str = "ternary_norm") -> dict:
    return {u: 1 - ppl(cells, user=u, condition=mine) / ppl(cells, user=u, condition="ternary_base")
            for u in values(cells, "user")}


def judge(cells: list, criteria: dict, mine: str = "ternary_norm") -> str:
    imp = list(improvements(cells, mine).values())
    count = lambda key: sum(i >= criteria[key]["min_improvement"] for i in imp)  # noqa: E731
    return grade(count("STRICT") >= criteria["STRICT"]["min_users"], count("LENIENT") >= criteria["LENIENT"]["min_users"],
                 criteria["CATASTROPHIC"]["no_improvement_on_any_user"] and all(i <= 0 for i in imp))


def verdict(cells: list, criteria: dict) -> str:
    return judge(cells, criteria)


def controls(cells: list, criteria: dict) -> dict:
    """A norm adapter trained on uniform random tokens on the ternary base: does 'repairing the base' alone pass?"""
    name = "norm adapter of random tokens on the ternary base"
    if not select(cells, condition="ternary_random"):
        return {name: not_run("no ternary_random cells in this result; run added 2026-11-30, --force runs it")}
    return {name: judge(cells, criteria, "ternary_random")}


def summary(cells: list) -> str:
    per = "; ".join(f"{u} fp/ternary/ternary+norm "
                    f"{'/'.join(fmt(ppl(cells, user=u, condition=c)) for c in ('fp_base', 'ternary_base', 'ternary_norm'))}"
                    f" ({100 * i:.1f} % better)" for u, i in improvements(cells).items())
    return per


BET = Bet(id="52", slug="quant_plus_adapter", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("ternary",),
          controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
