"""Bet 46: Bet 37's norm-vs-full comparison replicated over 5 seeds x 3 eval texts."""
from __future__ import annotations

from sharedllm.bets.cells import fmt, one, ppl, select, values
from sharedllm.bets.harness import Bet, grade, main, not_run

from .common import USERS

USER = "programmer"
SEEDS = 5
HYPOTHESIS = ("Bet 37's STRICT condition (norm ppl < 2x full-FT ppl, norm adapter < 1 % of full-FT size) holds "
              "for every (seed, eval text) pair, 5 training seeds x 3 eval texts on the programmer user.")
CRITERIA = {
    "pair_rule": "Bet 37 STRICT on one eval text for one seed: norm ppl / full ppl < 2.0 and norm bytes / "
                 "full bytes < 0.01",
    "max_ppl_ratio": 2.0, "max_size_ratio": 0.01, "pairs": 15,
    "STRICT": {"min_pairs_holding": 15}, "LENIENT": {"min_pairs_holding": 12},
    "CATASTROPHIC": {"below_pairs_holding": 8},
}

def run(ctx) -> list:
    rel, cells = USERS[USER], []
    seeds = ctx.opts.seeds or SEEDS
    cells += ctx.unit("base", lambda: ctx.score_cells(None, rel, user=USER, method="none", bytes=0))  # the control
    for seed in range(seeds):
        for method in ("norm", "full"):
            cells += ctx.unit(f"{method}/seed{seed}", lambda m=method, s=seed: trained_cells(ctx, rel, m, s))
    return cells


def trained_cells(ctx, rel: str, method: str, seed: int) -> list:
    path = ctx.adapter(rel, method, seed=seed)
    ctx.curve(f"{USER}/{method}/seed{seed}", path)
    cells = ctx.score_cells(path, rel, user=USER, method=method, seed=seed, bytes=path.stat().st_size)
    ctx.release()
    return cells


def holding(cells: list, criteria: dict, mine: str = "norm") -> tuple[int, int]:
    """(pairs where 37's STRICT rule holds for `mine` against full FT, pairs scored)."""
    k = n = 0
    for seed in values(cells, "seed", method="full"):
        for text in values(cells, "text", method="full", seed=seed):
            w = {"seed": seed, "text": text}
            r = ppl(cells, method=mine, **w) / ppl(cells, method="full", **w)
            size = one(cells, "bytes", method=mine, **w) / one(cells, "bytes", method="full", **w)
            k, n = k + (r < criteria["max_ppl_ratio"] and size < criteria["max_size_ratio"]), n + 1
    return k, n


def grade_pairs(k: int, n: int, criteria: dict) -> str:
    """Fractions of the declared pairs; fewer pairs than declared can never be STRICT."""
    frac = lambda key: criteria[key][next(iter(criteria[key]))] / criteria["pairs"]  # noqa: E731
    return grade(n >= criteria["pairs"] and k / n >= frac("STRICT"), k / n >= frac("LENIENT"),
                 k / n < frac("CATASTROPHIC"))


def verdict(cells: list, criteria: dict) -> str:
    return grade_pairs(*holding(cells, criteria), criteria)


def controls(cells: list, criteria: dict) -> dict:
    """The bare base (0 bytes, the same for every seed) in the norm adapter's place, pair by pair."""
    base = select(cells, method="none")
    if not base:
        return {"bare base": not_run("no base cells, method none")}
    per_seed = [{**c, "seed": s} for s in values(cells, "seed", method="full") for c in base]
    return {"bare base": grade_pairs(*holding(select(cells, method="full") + per_seed, criteria, "none"), criteria)}


def summary(cells: list) -> str:
    k, n = holding(cells, CRITERIA)
    rs = [ppl(cells, method="norm", seed=s) / ppl(cells, method="full", seed=s) for s in values(cells, "seed")]
    return (f"37's STRICT holds in {k}/{n} (seed, text) pairs; norm/full ppl ratio per seed "
            f"{', '.join(fmt(r) for r in rs)}")

BET = Bet(id="46", slug="replication", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("seeds",),
          controls=controls, borrow=(("37", {"method": "none"}),))

if __name__ == "__main__":
    raise SystemExit(main(BET))
