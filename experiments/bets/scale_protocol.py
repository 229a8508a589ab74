"""The scale protocol (the catalogue's open "1B+" question): the whole personalisation story on one base, one command.

>= 10 users (default 12: three each of programmer, novelist, scientist, heterogeneous), norm and LoRA-r4 adapters
(full fine-tuning with --full-ft), the full confusion matrix of norm adapters, the random-token control, the ternary
composition, seeds x eval texts. Runs unchanged on a larger local HF base on a GPU: --base DIR --device cuda.
"""
from __future__ import annotations

from pathlib import Path

from sharedllm.base import load_base
from sharedllm.errors import SharedLLMError

from .cells import beats, best_other_adapter, confusion_outcomes, ppl, select, values
from .harness import Bet, MissingDependency, grade, main, not_run

USERS = ["programmer/cpython_asyncio", "programmer/requests", "programmer/flask",
         "novelist/austen_pride_and_prejudice", "novelist/dickens_tale_of_two_cities",
         "novelist/doyle_adventures_of_sherlock_holmes", "scientist/arxiv_astro_ph", "scientist/arxiv_cond_mat",
         "scientist/arxiv_math_oc", "heterogeneous/speeches_clinton_sotu", "heterogeneous/speeches_reagan_sotu",
         "heterogeneous/phone_switchboard"]
SEEDS, QUICK_SEEDS = 3, 1
MIN_USERS = 10  # the hypothesis: ">= 10 users"; fewer users or seeds than declared can never be STRICT
HYPOTHESIS = ("On this base, each user's own norm-only adapter beats every other user's adapter and the bare base "
              "by >= 5 % held-out ppl for >= 90 % of users (>= 10 users, seeds x eval texts pooled).")
CRITERIA = {
    "margin": 0.05, "win": "own ppl <= (1 - margin) x min(every other user's norm adapter, base), pooled over "
                           "seeds and eval texts",
    "STRICT": {"min_fraction_of_users_won": 0.9}, "LENIENT": {"above_fraction_of_users_won": 0.5},
    "CATASTROPHIC": {"max_fraction_of_users_won": 0.25},
}


def resolve_users(opts) -> list:
    if not opts.users:
        return USERS
    if len(opts.users) == 1 and Path(opts.users[0]).is_dir():
        root = Path(opts.users[0])
        return [str(p) for p in sorted(root.rglob("*.txt"))]
    return list(opts.users)


def name(rel: str) -> str:
    p = Path(rel)
    return f"{p.parent.name}/{p.stem}" if p.suffix == ".txt" else rel


def run(ctx) -> list:
    users = resolve_users(ctx.opts)
    if len(users) < 2:
        raise SharedLLMError(f"scale_protocol needs at least 2 users, got {len(users)}")
    seeds = ctx.opts.seeds or (QUICK_SEEDS if ctx.quick else SEEDS)
    methods = ["norm", "lora"] + (["full"] if ctx.opts.full_ft else [])
    ctx.notes.update({"methods": methods, "n_users": len(users), "n_seeds": seeds})
    cells = confusion(ctx, users, seeds) + rival_methods(ctx, users, seeds, methods[1:]) + random_control(ctx, users)
    return cells + ternary_composition(ctx, users)


def confusion(ctx, users: list, seeds: int) -> list:
    cells = []
    for u in users:
        cells += ctx.unit(f"base/{name(u)}", lambda u=u: ctx.score_cells(
            None, u, kind="confusion", adapter="base", user=name(u), seed=-1))
    for seed in range(seeds):
        for a in users:
            row = lambda a=a, seed=seed: confusion_row(ctx, users, a, seed)  # noqa: E731
            cells += ctx.unit(f"confusion/{name(a)}/seed{seed}", row)
    return cells


def confusion_row(ctx, users: list, a: str, seed: int) -> list:
    """Train user a's norm adapter and score it on every user's eval texts."""
    path = ctx.adapter(a, "norm", seed=seed)
    ctx.curve(f"{name(a)}/norm/seed{seed}", path)
    cells = []
    for u in users:
        cells += ctx.score_cells(path, u, kind="confusion", adapter=name(a), user=name(u), seed=seed)
    ctx.release()
    return cells


def rival_methods(ctx, users: list, seeds: int, methods: list) -> list:
    cells = []
    for method in methods:
        for seed in range(seeds):
            for u in users:
                cells += ctx.unit(f"{method}/{name(u)}/seed{seed}", lambda m=method, s=seed, u=u: rival(ctx, u, m, s))
    return cells


def rival(ctx, u: str, method: str, seed: int) -> list:
    path = ctx.adapter(u, method, seed=seed)
    ctx.curve(f"{name(u)}/{method}/seed{seed}", path)
    cells = ctx.score_cells(path, u, kind="method", method=method, user=name(u), seed=seed, bytes=path.stat().st_size)
    ctx.release()
    return cells


def random_control(ctx, users: list) -> list:
    cells = []
    for u in users:
        cells += ctx.unit(f"random/{name(u)}", lambda u=u: random_cells(ctx, u))
    return cells


def random_cells(ctx, u: str) -> list:
    path = ctx.adapter(u, "norm", tag="_random", tokens=ctx.random_tokens(u))
    cells = ctx.score_cells(path, u, kind="random", user=name(u), seed=0)
    ctx.release()
    return cells


def ternary_composition(ctx, users: list) -> list:
    if ctx.opts.ternary == "none":
        ctx.notes["ternary"] = "skipped (--ternary none)"
        return []
    try:
        tbase = load_base(str(ctx.ternary_file()), ctx.opts.device)
    except MissingDependency as e:
        ctx.notes["ternary"] = f"skipped: {e}"
        return []
    tctx, cells = ctx.rebased(tbase), []
    for u in users:
        cells += ctx.unit(f"ternary/{tbase.fingerprint[:16]}/{name(u)}", lambda u=u: ternary_cells(tctx, u))
    return cells


def ternary_cells(tctx, u: str) -> list:
    cells = tctx.score_cells(None, u, kind="ternary", condition="ternary_base", user=name(u), seed=0)
    path = tctx.adapter(u, "norm")
    cells += tctx.score_cells(path, u, kind="ternary", condition="ternary_norm", user=name(u), seed=0)
    tctx.release()
    return cells


def won_fraction(cells: list, criteria: dict) -> float:
    out = confusion_outcomes(select(cells, kind="confusion"), criteria["margin"])
    return sum(w for w, _ in out.values()) / len(out)


def declared_scale(cells: list) -> bool:
    """At least MIN_USERS users and SEEDS training seeds in the confusion matrix (the base rows carry seed -1)."""
    conf = select(cells, kind="confusion")
    seeds = [s for s in values(conf, "seed") if s != -1]
    return len(values(conf, "user")) >= MIN_USERS and len(seeds) >= SEEDS


def tiers(cells: list, criteria: dict) -> tuple[bool, bool, bool]:
    f, eps = won_fraction(cells, criteria), 1e-9
    return (f >= criteria["STRICT"]["min_fraction_of_users_won"] - eps and declared_scale(cells),
            f > criteria["LENIENT"]["above_fraction_of_users_won"] + eps,
            f <= criteria["CATASTROPHIC"]["max_fraction_of_users_won"] + eps)


def verdict(cells: list, criteria: dict) -> str:
    return grade(*tiers(cells, criteria))


def side_verdicts(cells: list, criteria: dict) -> dict:
    """The catalogue words this bet with STRICT / LENIENT only: its CATASTROPHIC tier is this project's own."""
    strict, lenient, _ = tiers(cells, criteria)
    return {"by the catalogue's wording (no CATASTROPHIC tier)": grade(strict, lenient, False)}


def random_as_own(cells: list) -> list:
    """The confusion matrix with each user's own adapter replaced by the norm adapter trained on random tokens."""
    conf = [c for c in select(cells, kind="confusion") if c["adapter"] != c["user"]]
    return conf + [{**c, "kind": "confusion", "adapter": c["user"]} for c in select(cells, kind="random")]


def controls(cells: list, criteria: dict) -> dict:
    name = "norm adapter of random tokens as the user's own"
    if not select(cells, kind="random"):
        return {name: not_run("no random-token cells, kind random")}
    return {name: verdict(random_as_own(cells), criteria)}


def protocol(cells: list) -> str:
    """What ran, against what the protocol declares (users, seeds, rival methods)."""
    conf = select(cells, kind="confusion")
    n_users, seeds = len(values(conf, "user")), [s for s in values(conf, "seed") if s != -1]
    rivals = values(cells, "method", kind="method")
    full = "with" if "full" in rivals else "no"
    reduced = "reduced protocol" if len(seeds) < SEEDS or "full" not in rivals else "protocol"
    return f"{reduced}: {n_users} users, {len(seeds)} of {SEEDS} seeds, rivals {'/'.join(rivals) or 'none'} ({full} full FT)"


def _span(xs: list) -> str:
    return f"{100 * min(xs):.1f}-{100 * max(xs):.1f} %"


def summary(cells: list) -> str:
    conf = select(cells, kind="confusion")
    users = values(conf, "user")
    own = {u: ppl(conf, user=u, adapter=u) for u in users}
    best_other = {u: best_other_adapter(conf, u) for u in users}
    n_best = sum(best for _, best in confusion_outcomes(conf, CRITERIA["margin"]).values())
    parts = [protocol(cells), f"own norm adapter wins by >= 5 % for {won_fraction(cells, CRITERIA):.0%} of {len(users)} users",
             f"own adapter is the best one for {n_best}/{len(users)}: "
             f"{_span([1 - own[u] / ppl(conf, user=u, adapter='base') for u in users])} below the base, "
             f"{_span([1 - own[u] / best_other[u] for u in users])} below the best other user's adapter"]
    if select(cells, kind="random"):
        k = sum(beats(own[u], ppl(cells, kind="random", user=u), 0.05) for u in users)
        parts.append(f"real beats random-token control by >= 5 % for {k}/{len(users)}")
    for m in values(cells, "method", kind="method"):
        k = sum(own[u] < ppl(cells, kind="method", method=m, user=u) for u in users)
        parts.append(f"norm beats {m} for {k}/{len(users)}")
    if select(cells, kind="ternary"):
        imp = [1 - ppl(cells, kind="ternary", condition="ternary_norm", user=u)
               / ppl(cells, kind="ternary", condition="ternary_base", user=u) for u in users]
        parts.append(f"norm on ternary base improves it by {_span(imp)} (mean {100 * sum(imp) / len(imp):.1f} %)")
    return "; ".join(parts)


BET = Bet(id="scale_protocol", slug="scale_protocol", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("users", "seeds", "full_ft", "ternary"),
          side_verdicts=side_verdicts, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
