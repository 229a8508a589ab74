"""Bet 52: norm-only adapters trained on the ternary base recover much of its loss for each user."""
from __future__ import annotations

from sharedllm.base import load_base

from .cells import fmt, ppl, values
from .common import USERS
from .harness import Bet, grade, main

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
        tctx.release()
    ctx.notes["ternary_fingerprint"] = tbase.fingerprint
    return cells


def improvements(cells: list) -> dict:
    return {u: 1 - ppl(cells, user=u, condition="ternary_norm") / ppl(cells, user=u, condition="ternary_base")
            for u in values(cells, "user")}


def verdict(cells: list, criteria: dict) -> str:
    imp = list(improvements(cells).values())
    count = lambda key: sum(i >= criteria[key]["min_improvement"] for i in imp)  # noqa: E731
    return grade(count("STRICT") >= criteria["STRICT"]["min_users"], count("LENIENT") >= criteria["LENIENT"]["min_users"],
                 criteria["CATASTROPHIC"]["no_improvement_on_any_user"] and all(i <= 0 for i in imp))


def summary(cells: list) -> str:
    per = "; ".join(f"{u} fp/ternary/ternary+norm "
                    f"{'/'.join(fmt(ppl(cells, user=u, condition=c)) for c in ('fp_base', 'ternary_base', 'ternary_norm'))}"
                    f" ({100 * i:.1f} % better)" for u, i in improvements(cells).items())
    return per


BET = Bet(id="52", slug="quant_plus_adapter", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("ternary",))

if __name__ == "__main__":
    raise SystemExit(main(BET))
