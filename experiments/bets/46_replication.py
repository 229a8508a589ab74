"""Bet 46: Bet 37's norm-vs-full comparison replicated over 5 seeds x 3 eval texts."""
from __future__ import annotations

from .cells import fmt, one, ppl, values
from .common import USERS
from .harness import Bet, grade, main

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

def holding(cells: list, criteria: dict) -> tuple[int, int]:
    k = n = 0
    for seed in values(cells, "seed"):
        for text in values(cells, "text", seed=seed):
            w = {"seed": seed, "text": text}
            r = ppl(cells, method="norm", **w) / ppl(cells, method="full", **w)
            size = one(cells, "bytes", method="norm", **w) / one(cells, "bytes", method="full", **w)
            k, n = k + (r < criteria["max_ppl_ratio"] and size < criteria["max_size_ratio"]), n + 1
    return k, n

def verdict(cells: list, criteria: dict) -> str:
    k, n = holding(cells, criteria)
    frac = lambda key: criteria[key][next(iter(criteria[key]))] / criteria["pairs"]  # noqa: E731
    return grade(k / n >= frac("STRICT"), k / n >= frac("LENIENT"), k / n < frac("CATASTROPHIC"))

def summary(cells: list) -> str:
    k, n = holding(cells, CRITERIA)
    rs = [ppl(cells, method="norm", seed=s) / ppl(cells, method="full", seed=s) for s in values(cells, "seed")]
    return (f"37's STRICT holds in {k}/{n} (seed, text) pairs; norm/full ppl ratio per seed "
            f"{', '.join(fmt(r) for r in rs)}")

BET = Bet(id="46", slug="replication", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("seeds",))

if __name__ == "__main__":
    raise SystemExit(main(BET))
