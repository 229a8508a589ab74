"""The scale protocol (the catalogue's open "1B+" question): the whole personalisation story on one base, one command.

>= 10 users (default 12: three each of programmer, novelist, scientist, heterogeneous), norm and LoRA-r4 adapters
(full fine-tuning with --full-ft), the full confusion matrix of norm adapters, the random-token control, the ternary
composition, seeds x eval texts. Runs unchanged on a larger local HF base on a GPU: --base DIR --device cuda.

The tuned-lr arm (added 2026-11-30, before any run on a larger base): the same confusion matrix and LoRA-r4 at
the lr per method that bet lr_sensitivity chose on the default base's dev text (transferred, not re-tuned on this
base; the result's notes say so). Its verdict is a side verdict; the pre-registered verdict stays the catalogue lr's.
Full fine-tuning (--full-ft) is trained for the first user of each kind, at the catalogue lr.
"""
from __future__ import annotations

from pathlib import Path

from sharedllm.base import load_base
from sharedllm.bets.cells import beats, best_other_adapter, confusion_outcomes, ppl, select, values
from sharedllm.bets.harness import Bet, MissingDependency, grade, main, not_run
from sharedllm.errors import SharedLLMError

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
    cells = base_rows(ctx, users) + tuned_arm(ctx, users)
    cells += confusion(ctx, users, seeds) + rival_methods(ctx, users, seeds, methods[1:2])
    cells += random_control(ctx, users) + full_ft(ctx, users, methods)
    return cells + ternary_composition(ctx, users)


def base_rows(ctx, users: list) -> list:
    cells = []
    for u in users:
        cells += ctx.unit(f"base/{name(u)}", lambda u=u: ctx.score_cells(
            None, u, kind="confusion", adapter="base", user=name(u), seed=-1))
    return cells


def confusion(ctx, users: list, seeds: int, lr: float | None = None) -> list:
    """Every user's norm adapter (per seed) on every user's eval texts; at `lr` (tuned arm) or the catalogue's."""
    cells, tag = [], "" if lr is None else f"lr{lr:g}/"
    for seed in range(seeds):
        for a in users:
            row = lambda a=a, seed=seed: confusion_row(ctx, users, a, seed, lr)  # noqa: E731
            cells += ctx.unit(f"confusion/{tag}{name(a)}/seed{seed}", row)
    return cells


def confusion_row(ctx, users: list, a: str, seed: int, lr: float | None = None) -> list:
    """Train user a's norm adapter and score it on every user's eval texts."""
    path = ctx.adapter(a, "norm", seed=seed, lr=lr)
    ctx.curve(f"{name(a)}/norm/seed{seed}" + ("" if lr is None else f"/lr{lr:g}"), path)
    kind = {"kind": "confusion"} if lr is None else {"kind": "tuned_confusion", "lr": lr}
    cells = []
    for u in users:
        cells += ctx.score_cells(path, u, adapter=name(a), user=name(u), seed=seed, **kind)
    ctx.release()
    return cells


def rival_methods(ctx, users: list, seeds: int, methods: list, lr: float | None = None) -> list:
    cells, tag = [], "" if lr is None else f"lr{lr:g}/"
    for method in methods:
        for seed in range(seeds):
            for u in users:
                cells += ctx.unit(f"{method}/{tag}{name(u)}/seed{seed}",
                                  lambda m=method, s=seed, u=u: rival(ctx, u, m, s, lr))
    return cells


def rival(ctx, u: str, method: str, seed: int, lr: float | None = None) -> list:
    path = ctx.adapter(u, method, seed=seed, lr=lr)
    ctx.curve(f"{name(u)}/{method}/seed{seed}" + ("" if lr is None else f"/lr{lr:g}"), path)
    kind = {"kind": "method"} if lr is None else {"kind": "tuned_method", "lr": lr}
    cells = ctx.score_cells(path, u, method=method, user=name(u), seed=seed, bytes=path.stat().st_size, **kind)
    ctx.release()
    return cells


def first_of_each_kind(users: list) -> list:
    kinds: dict = {}
    for u in users:
        kinds.setdefault(name(u).split("/")[0], u)
    return list(kinds.values())


def full_ft(ctx, users: list, methods: list) -> list:
    if "full" not in methods:
        return []
    picked = first_of_each_kind(users)
    ctx.notes["full_ft_users"] = [name(u) for u in picked]
    return rival_methods(ctx, picked, 1, ["full"])


def tuned_arm(ctx, users: list) -> list:
    """Norm (the whole confusion matrix) and LoRA-r4 at lr_sensitivity's dev-chosen lrs, seed 0."""
    if ctx.quick:
        return []
    try:
        from .lr_sensitivity import committed_tuned_lrs

        lrs = committed_tuned_lrs(ctx, same_base=False)
    except MissingDependency as e:
        ctx.notes["tuned_arm"] = f"skipped: {e}"
        return []
    ctx.notes["tuned_lrs"] = lrs
    return confusion(ctx, users, 1, lrs["norm"]) + rival_methods(ctx, users, 1, ["lora"], lrs["lora"])


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
    """The catalogue words this bet with STRICT / LENIENT only: its CATASTROPHIC tier is this project's own. With
    the tuned-lr arm, the same rule on its confusion matrix (STRICT would need 3 seeds; the arm has one)."""
    strict, lenient, _ = tiers(cells, criteria)
    out = {"by the catalogue's wording (no CATASTROPHIC tier)": grade(strict, lenient, False)}
    if select(cells, kind="tuned_confusion"):
        out[f"at the tuned norm lr {tuned_lr_of(cells):g} (lr_sensitivity's)"] = verdict(as_tuned(cells), criteria)
    return out


def tuned_lr_of(cells: list) -> float:
    return values(cells, "lr", kind="tuned_confusion")[0]


def as_tuned(cells: list) -> list:
    """The tuned arm's cells in the catalogue arm's place: its confusion matrix (with the base rows) and LoRA."""
    base = [c for c in select(cells, kind="confusion") if c["adapter"] == "base"]
    swap = {"tuned_confusion": "confusion", "tuned_method": "method"}
    return base + [{**c, "kind": swap[c["kind"]]} for c in cells if c["kind"] in swap]


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
    if select(cells, kind="tuned_confusion"):
        parts.append(f"TUNED ARM (norm lr {tuned_lr_of(cells):g}): " + summary(as_tuned(cells)))
    return "; ".join(parts)


BET = Bet(id="scale_protocol", slug="scale_protocol", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("users", "seeds", "full_ft", "ternary"),
          side_verdicts=side_verdicts, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
