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

import json
import os
from pathlib import Path
from typing import NamedTuple

from sharedllm import registry
from sharedllm.base import load_base
from sharedllm.bets.cells import beats, best_other_adapter, confusion_outcomes, ppl, select, values
from sharedllm.bets.harness import Bet, MissingDependency, grade, main, not_run
from sharedllm.bets.report import runs_of
from sharedllm.errors import SharedLLMError

from .common import adapter_cells, footprint, in_fleets
from .figures import confusion_plot, save

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
        key = lambda a, seed=seed: f"confusion/{tag}{name(a)}/seed{seed}"  # noqa: E731
        ready = in_fleets(ctx, f"{tag}seed{seed}", users, key, name, seed=seed, lr=lr)
        for a in ready:
            row = lambda a=a, seed=seed: confusion_row(ctx, users, a, seed, lr)  # noqa: E731
            cells += ctx.unit(key(a), row)
    return cells


def confusion_row(ctx, users: list, a: str, seed: int, lr: float | None = None) -> list:
    """Train user a's norm adapter and score it on every user's eval texts; a's own cells carry its footprint."""
    kind = {"kind": "confusion"} if lr is None else {"kind": "tuned_confusion", "lr": lr}

    def cell(u: str, path: Path, side: dict) -> dict:
        own = footprint(path, side) if u == a else {}
        return {"adapter": name(a), "user": name(u), "seed": seed, **kind, **own}

    return adapter_cells(ctx, a, "norm", curve_key(a, "norm", seed, lr), cell, on=users, seed=seed, lr=lr)


def curve_key(u: str, method: str, seed: int, lr: float | None) -> str:
    return f"{name(u)}/{method}/seed{seed}" + ("" if lr is None else f"/lr{lr:g}")


def rival_methods(ctx, users: list, seeds: int, methods: list, lr: float | None = None) -> list:
    cells, tag = [], "" if lr is None else f"lr{lr:g}/"
    for method in methods:
        for seed in range(seeds):
            for u in users:
                cells += ctx.unit(f"{method}/{tag}{name(u)}/seed{seed}",
                                  lambda m=method, s=seed, u=u: rival(ctx, u, m, s, lr))
    return cells


def rival(ctx, u: str, method: str, seed: int, lr: float | None = None) -> list:
    kind = {"kind": "method"} if lr is None else {"kind": "tuned_method", "lr": lr}
    return adapter_cells(ctx, u, method, curve_key(u, method, seed, lr), lambda _, path, side: {
        "method": method, "user": name(u), "seed": seed, **footprint(path, side), **kind}, seed=seed, lr=lr)


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
    """The norm adapter trained on random tokens, for every user or (--random-users N) the first N."""
    if ctx.opts.random_users is not None:
        users = users[:ctx.opts.random_users]
        ctx.notes["random_control_users"] = [name(u) for u in users]
    cells, key = [], lambda u: f"random/{name(u)}"  # noqa: E731
    for u in in_fleets(ctx, "random", users, key, name, tag="_random", tokens=ctx.random_tokens):
        cells += ctx.unit(key(u), lambda u=u: random_cells(ctx, u))
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
    if not quantised(ctx):
        return []  # enumerating: the quantise unit runs first, the ternary units come in the next pass
    try:
        tbase = ternary_base(str(ctx.ternary_file()), ctx.opts.device)
    except MissingDependency as e:
        ctx.notes["ternary"] = f"skipped: {e}"
        return []
    tctx, cells = ctx.rebased(tbase), []
    key = lambda u: f"ternary/{tbase.fingerprint[:16]}/{name(u)}"  # noqa: E731
    for u in in_fleets(tctx, f"ternary/{tbase.fingerprint[:16]}", users, key, name):
        cells += ctx.unit(key(u), lambda u=u: ternary_cells(tctx, u))
    return cells


_TERNARY: dict = {}  # (file, its mtime, device) -> its Base: a Ray driver enumerates the units as each one lands


def ternary_base(path: str, device: str):
    key = (path, os.stat(path).st_mtime_ns, device)
    if key not in _TERNARY:
        _TERNARY.clear()  # hold one
        _TERNARY[key] = load_base(path, device)
    return _TERNARY[key]


def quantised(ctx) -> bool:
    """Quantising a base (`sharedllm quantize`: per-layer PTQ, then repair steps) is a unit of its own, so that on
    Ray it runs in a worker beside the other units instead of holding up the driver (~2 h for the 0.5B on a CPU).
    True once the ternary file is there."""
    if ctx.opts.ternary:
        return True
    def quantise() -> list:
        ctx.ternary_file()
        return []  # no cells: the file under --out is what the ternary units need

    ctx.unit(f"quantize/{ctx.fingerprint[:16]}", quantise)
    if ctx.ternary_target().is_file():
        return True
    return ctx.deferred is None and ctx.target is None and ctx.ternary_file().is_file()


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
    """The confusion matrix with each user's own adapter replaced by the norm adapter trained on random tokens,
    on the eval texts of the users that have one (--random-users N: the first N)."""
    users = values(cells, "user", kind="random")
    conf = [c for c in select(cells, kind="confusion") if c["adapter"] != c["user"] and c["user"] in users]
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
        rand = values(cells, "user", kind="random")
        k = sum(beats(own[u], ppl(cells, kind="random", user=u), 0.05) for u in rand)
        parts.append(f"real beats random-token control by >= 5 % for {k}/{len(rand)}")
    for m in values(cells, "method", kind="method"):
        with_m = values(cells, "user", kind="method", method=m)  # full FT: the first user of each kind
        k = sum(own[u] < ppl(cells, kind="method", method=m, user=u) for u in with_m)
        parts.append(f"norm beats {m} for {k}/{len(with_m)}")
    if select(cells, kind="ternary"):
        imp = [1 - ppl(cells, kind="ternary", condition="ternary_norm", user=u)
               / ppl(cells, kind="ternary", condition="ternary_base", user=u)
               for u in values(cells, "user", kind="ternary")]
        parts.append(f"norm on ternary base improves it by {_span(imp)} (mean {100 * sum(imp) / len(imp):.1f} %)")
    if select(cells, kind="tuned_confusion"):
        parts.append(f"TUNED ARM (norm lr {tuned_lr_of(cells):g}): " + summary(as_tuned(cells)))
    return "; ".join(parts)


# ---- REPORT.md's plots of this base's result ----

def plots(results: dict, folder: Path) -> list:
    """The default base's confusion matrix, and each user's conditions relative to the base."""
    r = results.get(BET.id)
    if r is None:
        return []
    conf = select(r["cells"], kind="confusion")
    return [confusion_plot(conf, BET.id, folder / "scale_confusion_matrix.png"), scale_plot(r["cells"], folder)]


def scale_conditions(cells: list, user: str) -> dict:
    """Each condition's held-out ppl on `user`'s text as a fraction of the bare base's (ternary: of the ternary
    base's); absent conditions are left out."""
    conf, base = select(cells, kind="confusion"), ppl(cells, kind="confusion", adapter="base", user=user)
    out = {"own norm": ppl(conf, adapter=user, user=user) / base,
           "best other user's norm": best_other_adapter(conf, user) / base}
    for m in values(cells, "method", kind="method"):
        out[f"own {m}"] = ppl(cells, kind="method", method=m, user=user) / base
    if select(cells, kind="random", user=user):
        out["norm on random tokens"] = ppl(cells, kind="random", user=user) / base
    if select(cells, kind="ternary", user=user):
        out["ternary: own norm / ternary base"] = (ppl(cells, kind="ternary", condition="ternary_norm", user=user)
                                                   / ppl(cells, kind="ternary", condition="ternary_base", user=user))
    return out


def scale_plot(cells: list, folder: Path) -> Path:
    import matplotlib.pyplot as plt

    users = values(select(cells, kind="confusion"), "user")
    rows = {u: scale_conditions(cells, u) for u in users}
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    fig, ax = plt.subplots(figsize=(4 + 0.9 * len(users), 4.6))
    width = 0.8 / len(names)
    for k, cond in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(users))]
        ax.bar(xs, [rows[u].get(cond, float("nan")) for u in users], width, label=cond, color=f"C{k}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="k", lw=0.8, ls="--", label="5 % better than the base")
    ax.set_xticks(range(len(users)), users, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("held-out ppl / base ppl")
    ax.set_ylim(min(0.9, min(min(r.values()) for r in rows.values()) - 0.02), 1.05)
    ax.set_title("Scale protocol: each user's held-out ppl relative to the base (lower is better)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, folder / "scale_protocol.png")


# ---- the scale report: one row per base (and per arm), from each base's result or its checkpoint ----

FLEET = 215_000  # the flagship scenario's users, one adapter each


def _median(xs: list) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2


def _spread(xs: list) -> dict:
    return {"median": _median(xs), "min": min(xs), "max": max(xs)} if xs else {}


def _per_user(cells: list, conf: list, users: list, kind: str, **where) -> dict:
    """Per user: 1 - own-norm ppl / this condition's ppl (> 0: own norm is better), where the cells exist."""
    own = {u: ppl(conf, user=u, adapter=u) for u in users}
    return {u: 1 - own[u] / ppl(cells, kind=kind, user=u, **where) for u in users
            if select(cells, kind=kind, user=u, **where)}


def _method_vs_base(cells: list, conf: list, users: list, method: str) -> list:
    """1 - ppl(the method's adapter) / ppl(base), for each user that has the method's cells."""
    return [1 - ppl(cells, kind="method", method=method, user=u) / ppl(conf, user=u, adapter="base")
            for u in users if select(cells, kind="method", method=method, user=u)]


def _bytes(cells: list, **where) -> int | None:
    sizes = [c["bytes"] for c in select(cells, **where) if "bytes" in c]
    return int(_median(sizes)) if sizes else None


def _train_s(cells: list, **where) -> float | None:
    walls = [c["train_s"] for c in select(cells, **where) if "train_s" in c]
    return round(_median(walls), 1) if walls else None


def trend_row(cells: list, arm: str = "catalogue") -> dict | None:
    """The scale report's numbers for one base and arm (catalogue lr, or the tuned lr): None without a full
    confusion matrix (every user's own adapter scored on every user's text)."""
    tuned = arm == "tuned"
    cells = as_tuned(cells) if tuned else cells
    conf = select(cells, kind="confusion")
    users = [u for u in values(conf, "user") if select(conf, user=u, adapter=u)]
    if len(users) < 2 or any(not select(conf, user=u, adapter="base") for u in users):
        return None
    conf = [c for c in conf if c["user"] in users and c["adapter"] in users + ["base"]]
    out = confusion_outcomes(conf, CRITERIA["margin"])
    others = {u: 1 - ppl(conf, user=u, adapter=u) / best_other_adapter(conf, u) for u in users}
    lora = _per_user(cells, conf, users, "method", method="lora")
    full = _method_vs_base(cells, conf, users, "full")
    return {
        "arm": arm, "users": len(users), "own_best": sum(b for _, b in out.values()),
        "won_5pct": sum(w for w, _ in out.values()),
        "gain_vs_base": _spread(list(_per_user(cells, conf, users, "confusion", adapter="base").values())),
        "margin_vs_best_other": _spread(list(others.values())),
        "lora_beats_norm": sum(v < 0 for v in lora.values()), "lora_users": len(lora),
        "lora_gain_vs_base": _spread(_method_vs_base(cells, conf, users, "lora")),
        "full_gain_vs_base": _spread(full), "full_users": len(full),
        "real_vs_random": _spread(list(_per_user(cells, conf, users, "random").values())),
        "ternary_recovery": _spread([1 - ppl(cells, kind="ternary", condition="ternary_norm", user=u)
                                     / ppl(cells, kind="ternary", condition="ternary_base", user=u)
                                     for u in users if select(cells, kind="ternary", user=u)]),
        "bytes": {m: b for m, b in (("norm", _bytes(conf, kind="confusion")),
                                    ("lora", _bytes(cells, kind="method", method="lora")),
                                    ("full", _bytes(cells, kind="method", method="full"))) if b},
        "train_s": {m: t for m, t in (("norm", _train_s(conf, kind="confusion")),
                                      ("lora", _train_s(cells, kind="method", method="lora")),
                                      ("full", _train_s(cells, kind="method", method="full"))) if t},
    }


def _pct(sp: dict) -> str:
    return f"{100 * sp['median']:+.1f} % ({100 * sp['min']:+.1f} to {100 * sp['max']:+.1f})" if sp else "—"


def _size(n: int | None) -> str:
    if not n:
        return "—"
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n} B"


def trend_table(rows: list) -> str:
    """Markdown: one line per (base, arm); rows are (label, status, trend_row) in size order."""
    head = ("| base | arm | status | users | own best | wins >= 5 % | own vs base (median, range) | own vs best other "
            "| LoRA beats norm | LoRA vs base | full FT vs base (users) | real vs random | ternary recovery "
            "| bytes/user norm / LoRA / full "
            f"| fleet of {FLEET:,} (norm / LoRA) | train s/adapter norm / LoRA / full |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, status, r in rows:
        b, t = r["bytes"], r["train_s"]
        full_n = f" ({r['full_users']})" if r["full_users"] else ""
        lines.append(
            f"| {label} | {r['arm']} | {status} | {r['users']} | {r['own_best']}/{r['users']} | "
            f"{r['won_5pct']}/{r['users']} | {_pct(r['gain_vs_base'])} | {_pct(r['margin_vs_best_other'])} | "
            f"{r['lora_beats_norm']}/{r['lora_users']} | {_pct(r['lora_gain_vs_base'])} | "
            f"{_pct(r['full_gain_vs_base'])}{full_n} | "
            f"{_pct(r['real_vs_random'])} | "
            f"{_pct(r['ternary_recovery'])} | {' / '.join(_size(b.get(m)) for m in ('norm', 'lora', 'full'))} | "
            f"{' / '.join(_size(b[m] * FLEET) if m in b else '—' for m in ('norm', 'lora'))} | "
            f"{' / '.join(str(t.get(m, '—')) for m in ('norm', 'lora', 'full'))} |")
    return "\n".join(lines)


def _dtype(dtype: str) -> str:
    """The status suffix " (bf16)" of a run in a compute dtype other than fp32 (--dtype), else nothing."""
    return f" ({dtype})" if dtype != "fp32" else ""


class ScaleRun(NamedTuple):
    """One scale_protocol run: a finished result (status: its verdict) or a checkpoint (partial)."""
    base: str
    status: str
    cells: list
    dtype: str = "fp32"
    partial: bool = False


def scale_runs(results_dir: Path) -> list:
    """A ScaleRun for the default base's result and each results/other/<base>/ run (a finished result, else its
    checkpoint), in order of base size."""
    runs = []
    for run in runs_of(results_dir, "scale_protocol"):
        if run.partial:
            status = f"partial: {len(run.units)} units{_dtype(run.dtype)}"
        else:
            status = run.result["verdict"] + (" (incomplete)" if run.result.get("incomplete") else "") + _dtype(run.dtype)
        runs.append(ScaleRun(run.base, status, run.cells, run.dtype, partial=run.partial))
    return runs


def trend_rows(runs: list, norm_bytes: dict | None = None) -> list:
    """norm_bytes: base -> a norm adapter file's size measured by another bet, for runs whose cells predate the
    scale protocol's own `bytes` field (the 135M run)."""
    rows = []
    for run in runs:
        nb = registry.resolve(run.base)
        size = f"{nb.params / 1e6:,.0f}M" if nb else run.base
        label = f"{run.base} ({size})" if nb else run.base
        for r in (trend_row(run.cells), trend_row(run.cells, "tuned")):
            if r is not None:
                if "norm" not in r["bytes"] and (norm_bytes or {}).get(run.base):
                    r["bytes"]["norm"] = norm_bytes[run.base]
                r["tick"] = _tick(size, run.dtype, run.partial)
                rows.append((label, run.status, r))
    return rows


def norm_bytes_elsewhere(results_dir: Path) -> dict:
    """base -> the size of a norm adapter file recorded by lr_sensitivity or 49 on that base."""
    out = {}
    for name in ("lr_sensitivity.json", "49_adapter_shootout.json"):
        path = Path(results_dir) / name
        if path.is_file():
            r = json.loads(path.read_text())
            sizes = [c["bytes"] for c in r["cells"] if c.get("method") == "norm" and c.get("bytes")]
            if sizes:
                out.setdefault(r["config"]["base"], int(_median(sizes)))
    return out


def _tick(size: str, dtype: str, partial: bool) -> str:
    """A run's tick on the scale plot: its size, compute dtype and whether it is finished."""
    return f"{size}\n{dtype}" + ("\npartial" if partial else "")


TREND_PANELS = (("gain_vs_base", "own norm vs base"), ("margin_vs_best_other", "own vs best other user's"),
                ("real_vs_random", "own vs its random-token control"), ("lora_gain_vs_base", "LoRA-r4 vs base"),
                ("ternary_recovery", "own norm on the ternary base vs it"))


def trend_plot(rows: list, folder: Path) -> Path:
    """One tick per run (base size, dtype, partial or not), the catalogue and tuned arms side by side: own norm vs
    base, vs the best other user's adapter, vs its random-token control, LoRA vs base, and the own norm adapter on
    the ternary base vs that bare ternary base (median, range)."""
    import matplotlib.pyplot as plt

    ticks = list(dict.fromkeys(r["tick"] for _, _, r in rows))
    fig, axes = plt.subplots(1, len(TREND_PANELS), figsize=(18, 4.2), sharey=True)
    for ax, (key, title) in zip(axes, TREND_PANELS):
        for _, _, r in rows:
            sp, tuned = r[key], r["arm"] == "tuned"
            if sp:
                x = ticks.index(r["tick"]) + (0.15 if tuned else -0.15)
                ax.errorbar([x], [100 * sp["median"]], yerr=[[100 * (sp["median"] - sp["min"])],
                                                             [100 * (sp["max"] - sp["median"])]],
                            fmt="s" if tuned else "o", capsize=4, color="tab:orange" if tuned else "tab:blue",
                            label="tuned lr" if tuned else "catalogue lr 5e-5")
        ax.axhline(100 * CRITERIA["margin"], color="grey", ls="--", lw=0.8)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlim(-0.6, len(ticks) - 0.4)
        ax.set_title(title, fontsize=9)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    axes[0].legend(handles.values(), handles.keys(), fontsize=7, loc="upper left")
    axes[0].set_ylabel("ppl reduction, % (median, range over users)")
    fig.suptitle("scale_protocol across bases (dashed: the 5 % bar; x: parameters, compute dtype)", fontsize=10)
    fig.tight_layout()
    return save(fig, Path(folder) / "scale_trend.png")


def report_section(results_dir: Path, plots_dir: Path, root: Path) -> list:
    """REPORT.md's scale section: the table across bases and arms, and its plot."""
    rows = trend_rows(scale_runs(results_dir), norm_bytes_elsewhere(results_dir))
    if not rows:
        return []
    plot = trend_plot(rows, plots_dir)
    return ["", "## Scale: the protocol across bases", "",
            "One row per base and arm (catalogue lr 5e-5; tuned: lr_sensitivity's lrs, transferred). Percentages "
            "are 1 - ppl(own norm adapter) / ppl(comparison) per user (for LoRA: 1 - ppl(LoRA) / ppl(base)), median "
            "and range over users; a run not finished (or stopped, like the fp32 0.5B run continued in bf16) shows "
            "its checkpointed units ('partial'). Fleet storage = bytes per "
            f"adapter x {FLEET:,} users.", "", trend_table(rows), "",
            f"![scale_trend]({os.path.relpath(plot, root)})"]


BET = Bet(id="scale_protocol", slug="scale_protocol", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary,
          accepts=("users", "seeds", "full_ft", "ternary", "random_users", "eval_len"),
          side_verdicts=side_verdicts, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
