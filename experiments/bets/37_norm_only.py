"""Bet 37: norm-only vs LoRA-r4 vs full fine-tuning on the programmer user, 3 eval texts."""
from __future__ import annotations

from sharedllm.bets.cells import fmt, one, ppl, select, values
from sharedllm.bets.common import EVAL_TEXTS
from sharedllm.bets.harness import Bet, grade, main, not_run

from .common import USERS

USER = "programmer"
METHODS = ("norm", "lora", "full")
HYPOTHESIS = ("On the programmer user, a norm-only adapter gets within 2x of full fine-tuning's held-out ppl "
              "while being under 1 % of its size.")
CRITERIA = {
    "measure": "ppl ratio = norm ppl / full-FT ppl, pooled over the 3 eval texts; size ratio = norm adapter "
               "bytes / full-FT adapter bytes",
    "STRICT": {"max_ppl_ratio": 2.0, "max_size_ratio": 0.01},
    "LENIENT": {"max_ppl_ratio": 5.0},
    "CATASTROPHIC": {"min_ppl_ratio": 10.0},
}


def run(ctx) -> list:
    rel = USERS[USER]
    cells = ctx.score_cells(None, rel, user=USER, method="none", bytes=0)
    for method in METHODS:
        path = ctx.adapter(rel, method)
        ctx.curve(f"{USER}/{method}", path)
        cells += ctx.score_cells(path, rel, user=USER, method=method, bytes=path.stat().st_size)
        ctx.release()
    return cells


def ratios(cells: list, mine: str = "norm", **where) -> tuple[float, float]:
    ppl_ratio = ppl(cells, method=mine, **where) / ppl(cells, method="full", **where)
    return ppl_ratio, one(cells, "bytes", method=mine) / one(cells, "bytes", method="full")


def strict_holds(ppl_ratio: float, size_ratio: float, criteria: dict) -> bool:
    s = criteria["STRICT"]
    return ppl_ratio < s["max_ppl_ratio"] and size_ratio < s["max_size_ratio"]


def judge(cells: list, criteria: dict, mine: str = "norm") -> str:
    """The rule, for the norm adapter or a control in its place; STRICT needs all the declared eval texts."""
    r, size = ratios(cells, mine)
    texts = min(len(values(cells, "text", method=m)) for m in (mine, "full"))
    return grade(strict_holds(r, size, criteria) and texts >= EVAL_TEXTS, r < criteria["LENIENT"]["max_ppl_ratio"],
                 r > criteria["CATASTROPHIC"]["min_ppl_ratio"])


def verdict(cells: list, criteria: dict) -> str:
    return judge(cells, criteria)


def controls(cells: list, criteria: dict) -> dict:
    """The bare base (0 bytes) in the norm adapter's place."""
    have = select(cells, method="none")
    return {"bare base": judge(cells, criteria, "none") if have else not_run("no base cells, method none")}


def summary(cells: list) -> str:
    r, size = ratios(cells)
    p = ", ".join(f"{m} {fmt(ppl(cells, method=m))}" for m in ("none",) + METHODS)
    return f"held-out ppl {p}; norm/full ppl ratio {r:.3f}, size ratio {size:.2e}"


BET = Bet(id="37", slug="norm_only", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
