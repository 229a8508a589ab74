"""lr_sensitivity: is norm-only just under-trained at the catalogue's lr 5e-5? Each method at its tuned lr.

For norm, LoRA-r4 and full fine-tuning, a small learning-rate grid (100 steps at the catalogue's batch, seed 0, the
three fixture users). Each method's lr is chosen on the users' **dev** slices (held-out tokens after the eval texts,
disjoint from them and from the training pool); only then are the eval texts read: each method at its tuned lr beside
the catalogue's lr (49-style), the 3 x 4 confusion matrix (61-style) of norm at its tuned lr, general-text ppl, and how
far the gains moved from the base's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sharedllm.base import norm_modules
from sharedllm.bets.cells import confusion_outcomes, fmt, one, ppl, scored, select, values
from sharedllm.bets.common import GENERAL
from sharedllm.bets.harness import Bet, MissingDependency, grade, main
from sharedllm.personalise import load_adapted

from .common import USERS
from .figures import save

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results, beside this module
CATALOGUE_LR = 5e-5
GRID = {"norm": [5e-5, 5e-4, 2e-3, 1e-2], "lora": [5e-5, 2e-4, 1e-3], "full": [5e-6, 2e-5, 5e-5]}
HYPOTHESIS = ("Norm-only is under-trained at the catalogue's lr: at its lr tuned on dev text, each user's own norm "
              "adapter beats every other user's adapter and the bare base by >= 5 % held-out ppl for >= 2 of 3 users, "
              "with general-text ppl <= 1.05x the base's for every user.")
CRITERIA = {
    "grid": GRID, "catalogue_lr": CATALOGUE_LR, "margin": 0.05,
    "lr_choice": "per method, the grid lr with the lowest mean over users of log(dev ppl / base dev ppl); ties -> "
                 "the smaller lr; dev = 2,048 held-out tokens after the three eval texts",
    "win": "on the user's eval texts (pooled): own tuned norm ppl <= (1 - margin) x min(every other user's tuned "
           "norm adapter, base)",
    "general_ok": "tuned norm adapter's general-text ppl <= max_general_ratio x the base's",
    "STRICT": {"min_users_won": 2, "max_general_ratio": 1.05},
    "LENIENT": {"min_users_won": 1, "own_best_users": 3, "max_general_ratio": 1.10},
    "CATASTROPHIC": {"if_tuned_norm_lr_is_catalogue": True, "max_users_own_best": 1, "above_general_ratio": 1.25},
}


def run(ctx) -> list:
    cells = base_cells(ctx)
    for method, lrs in GRID.items():
        for lr in lrs:
            for user, rel in USERS.items():
                cells += ctx.unit(f"{method}/{user}/lr{lr:g}", lambda m=method, u=user, r=rel, x=lr:
                                  grid_unit(ctx, u, r, m, x))
    if ctx.deferred:  # enumerating units for Ray with grid units still to compute: the tuned lr needs them all
        return cells
    lr = tuned_lr(cells, "norm")
    for user, rel in USERS.items():
        cells += ctx.unit(f"confusion/lr{lr:g}/{user}", lambda u=user, r=rel: confusion_row(ctx, u, r, lr))
    return cells


def base_cells(ctx) -> list:
    def compute():
        out = [scored(*ctx.score_dev(None, rel), kind="grid", user=u, method="none", lr=0.0, eval="dev", text=0)
               for u, rel in USERS.items()]
        for u, rel in USERS.items():
            out += ctx.score_cells(None, rel, kind="grid", user=u, method="none", lr=0.0, eval="personal")
        return out + ctx.score_cells(None, GENERAL, kind="grid", user="-", method="none", lr=0.0, eval="general")
    return ctx.unit("base", compute)


def grid_unit(ctx, user: str, rel: str, method: str, lr: float) -> list:
    """Train one (user, method, lr) adapter; score it on the user's dev slice, eval texts and general text."""
    path = ctx.adapter(rel, method, lr=lr)
    side = ctx.curve(f"{user}/{method}/lr{lr:g}", path)
    tag = {"kind": "grid", "user": user, "method": method, "lr": lr, "bytes": path.stat().st_size,
           "params": side["params"]}
    cells = [scored(*ctx.score_dev(path, rel), eval="dev", text=0, **tag)]
    cells += ctx.score_cells(path, rel, eval="personal", **tag)
    cells += ctx.score_cells(path, GENERAL, eval="general", **tag)
    if method == "norm":
        cells.append({"kind": "gains", "user": user, "method": method, "lr": lr, **gain_moves(ctx.base, path)})
    ctx.release()
    return cells


@torch.no_grad()
def gain_moves(base, path) -> dict:
    """How far a norm adapter moved the gains: mean / max of |g - g0| and of |g - g0| / |g0| over all gains."""
    g0 = {f"{n}.weight": m.weight.detach().float() for n, m in norm_modules(base.model).items()}
    g = {k: v.detach().float() for k, v in load_adapted(base, path).params.items()}
    d = torch.cat([(g[k] - g0[k]).abs().flatten() for k in g0])
    rel = torch.cat([((g[k] - g0[k]).abs() / g0[k].abs().clamp_min(1e-3)).flatten() for k in g0])
    return {"abs_mean": d.mean().item(), "abs_max": d.max().item(), "rel_mean": rel.mean().item(),
            "rel_max": rel.max().item()}


def confusion_row(ctx, user: str, rel: str, lr: float) -> list:
    """User `user`'s tuned norm adapter (and, once, the base) on every fixture user's eval texts."""
    path = ctx.adapter(rel, "norm", lr=lr)
    cells = []
    for other, orel in USERS.items():
        cells += ctx.score_cells(path, orel, kind="confusion", adapter=user, user=other, lr=lr)
        if other == user:  # the base row of the matrix, once per eval user
            cells += ctx.score_cells(None, orel, kind="confusion", adapter="base", user=other, lr=lr)
    ctx.release()
    return cells


# ---- pure functions of the cells: the lr choice, the verdict, the summary ----

def dev_score(cells: list, method: str, lr: float) -> float:
    """Mean over users of log(dev ppl / base dev ppl): what the lr choice minimises."""
    users = values(cells, "user", kind="grid", method=method, lr=lr, eval="dev")
    return sum(math.log(ppl(cells, kind="grid", user=u, method=method, lr=lr, eval="dev")
                        / ppl(cells, kind="grid", user=u, method="none", eval="dev")) for u in users) / len(users)


def tuned_lr(cells: list, method: str) -> float:
    lrs = sorted(values(cells, "lr", kind="grid", method=method, eval="dev"))
    return min(lrs, key=lambda lr: (round(dev_score(cells, method, lr), 12), lr))


def committed_tuned_lrs(ctx, same_base: bool) -> dict:
    """The dev-chosen lr per method (norm, lora) from this bet's committed result on the default base, for the
    bets that build on it. same_base: refuse it on another base; else it is transferred and the notes say so."""
    path = RESULTS / "lr_sensitivity.json"
    if not path.is_file():
        raise MissingDependency(f"bet {ctx.bet.name} needs the committed result of lr_sensitivity ({path}); run "
                                "`sharedllm bet lr_sensitivity` first")
    result = json.loads(path.read_text())
    if result.get("incomplete"):
        raise MissingDependency(f"{path} is incomplete; finish `sharedllm bet lr_sensitivity` first")
    other = result["config"]["base_fingerprint"] != ctx.fingerprint
    if other and same_base:
        raise MissingDependency(f"{path} was measured on another base; run lr_sensitivity on this base first")
    ctx.notes["tuned_lr_source"] = (f"{path.name} (git {result['meta']['git_commit'][:10]}, base "
                                    f"{result['config']['base']}{', transferred: not tuned on this base' if other else ''})")
    return {m: tuned_lr(result["cells"], m) for m in ("norm", "lora")}


def general_ratio(cells: list, user: str, method: str, lr: float) -> float:
    return (ppl(cells, kind="grid", user=user, method=method, lr=lr, eval="general")
            / ppl(cells, kind="grid", method="none", eval="general"))


def personal(cells: list, user: str, method: str, lr: float | None = None) -> float:
    where = {"lr": lr} if lr is not None else {}
    return ppl(cells, kind="grid", user=user, method=method, eval="personal", **where)


def outcomes(cells: list, criteria: dict) -> dict:
    """Per user: (won: own beats every rival and the base by >= margin, own best, general ratio) at the tuned lr."""
    lr = tuned_lr(cells, "norm")
    conf = [c for c in select(cells, kind="confusion") if c["lr"] == lr]
    wins = confusion_outcomes(conf, criteria["margin"])
    return {u: (won, best, general_ratio(cells, u, "norm", lr)) for u, (won, best) in wins.items()}


def verdict(cells: list, criteria: dict) -> str:
    out = outcomes(cells, criteria)
    s, le, c = criteria["STRICT"], criteria["LENIENT"], criteria["CATASTROPHIC"]
    won = sum(w for w, _, _ in out.values())
    best = sum(b for _, b, _ in out.values())
    worst_general = max(g for _, _, g in out.values())
    untuned = c["if_tuned_norm_lr_is_catalogue"] and tuned_lr(cells, "norm") == criteria["catalogue_lr"]
    declared = len(out) >= len(USERS)  # fewer users than the bet declares can never be STRICT
    return grade(won >= s["min_users_won"] and worst_general <= s["max_general_ratio"] and declared,
                 won >= le["min_users_won"] and best >= le["own_best_users"] and worst_general <= le["max_general_ratio"],
                 untuned or best <= c["max_users_own_best"] or worst_general > c["above_general_ratio"])


def dominance(cells: list, lrs: dict, tol: float = 0.05) -> int:
    """49's rule with each method at the given lr: users for whom norm beats both rivals on personal ppl and bytes,
    with general ppl within `tol` of each rival's."""
    k = 0
    for u in values(cells, "user", kind="grid", method="norm"):
        n = {"user": u, "method": "norm", "lr": lrs["norm"]}
        ok = True
        for rival in ("lora", "full"):
            r = {"user": u, "method": rival, "lr": lrs[rival]}
            ok &= (personal(cells, **n) < personal(cells, **r)
                   and one(cells, "bytes", kind="grid", eval="personal", **n)
                   < one(cells, "bytes", kind="grid", eval="personal", **r)
                   and general_ratio(cells, **n) <= (1 + tol) * general_ratio(cells, **r))
        k += ok
    return k


def side_verdicts(cells: list, criteria: dict) -> dict:
    """Bet 49's rule (STRICT 3, LENIENT 2, CATASTROPHIC 0 users) at the tuned lrs and at the catalogue's lr."""
    tuned = {m: tuned_lr(cells, m) for m in GRID}
    catalogue = {"norm": criteria["catalogue_lr"], "lora": criteria["catalogue_lr"], "full": criteria["catalogue_lr"]}
    out = {}
    for name, lrs in (("49_rule_at_tuned_lrs", tuned), ("49_rule_at_catalogue_lr", catalogue)):
        k = dominance(cells, lrs)
        out[name] = grade(k >= 3, k >= 2, k == 0)
    return out


def summary(cells: list) -> str:
    tuned = {m: tuned_lr(cells, m) for m in GRID}
    out = outcomes(cells, CRITERIA)
    parts = []
    for u in values(cells, "user", kind="grid", method="norm"):
        conf = [c for c in select(cells, kind="confusion") if c["lr"] == tuned["norm"]]
        own = ppl(conf, adapter=u, user=u)
        rival = min(ppl(conf, adapter=a, user=u) for a in values(conf, "adapter", user=u) if a != u)
        p = "/".join(fmt(personal(cells, u, m, lr)) for m, lr in
                     (("none", None), ("norm", CATALOGUE_LR), ("norm", tuned["norm"]), ("lora", tuned["lora"]),
                      ("full", tuned["full"])))
        parts.append(f"{u} ppl base/norm@5e-5/norm@tuned/lora@tuned/full@tuned {p}, own vs best rival or base "
                     f"{100 * (1 - own / rival):.1f} %, general x{out[u][2]:.3f}")
    moves = [c for c in select(cells, kind="gains") if c["lr"] == tuned["norm"]]
    move = max(c["rel_mean"] for c in moves) if moves else float("nan")
    won = sum(w for w, _, _ in out.values())
    return (f"tuned lr (dev): norm {tuned['norm']:g}, lora {tuned['lora']:g}, full {tuned['full']:g}; own tuned norm "
            f"wins by >= 5 % for {won}/{len(out)} users; " + "; ".join(parts)
            + f"; mean relative gain move at tuned lr <= {move:.3g}")


# ---- REPORT.md's plot ----

def plots(results: dict, folder: Path) -> list:
    """ppl against lr per method and user, with the dev-chosen lr."""
    r = results.get(BET.id)
    return [lr_plot(r["cells"], folder)] if r else []


def lr_plot(cells: list, folder: Path) -> Path:
    """Bet lr_sensitivity: held-out ppl relative to the base against lr, one panel per method; solid: eval texts,
    dashed: dev slice (where the lr was chosen), dotted black: general text; grey line: the dev-chosen lr."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GRID), figsize=(4.2 * len(GRID), 3.6), sharey=True)
    for ax, method in zip(axes, GRID):
        lrs = sorted(values(cells, "lr", kind="grid", method=method))
        for k, user in enumerate(values(cells, "user", kind="grid", method=method)):
            for ev, style in (("personal", "-"), ("dev", "--")):
                base = ppl(cells, kind="grid", method="none", user=user, eval=ev)
                ys = [ppl(cells, kind="grid", method=method, user=user, lr=lr, eval=ev) / base for lr in lrs]
                ax.plot(lrs, ys, style, marker="o", color=f"C{k}", label=f"{user} ({'eval' if ev == 'personal' else ev})")
            gen = ppl(cells, kind="grid", method="none", eval="general")
            ax.plot(lrs, [ppl(cells, kind="grid", method=method, user=user, lr=lr, eval="general") / gen for lr in lrs],
                    ":", color="black", lw=1)
        ax.axvline(tuned_lr(cells, method), color="grey", lw=3, alpha=0.4)
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
        ax.set_title(f"{method}: chosen lr {tuned_lr(cells, method):g}", fontsize=10)
        ax.set_xlabel("learning rate (100 steps, AdamW)")
    axes[0].set_ylabel("held-out ppl / base ppl")
    axes[0].legend(fontsize=6)
    fig.suptitle("lr_sensitivity: solid eval texts, dashed dev slice, dotted general text (all users)", fontsize=10)
    return save(fig, folder / "lr_sensitivity.png")


BET = Bet(id="lr_sensitivity", slug="lr_sensitivity", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, side_verdicts=side_verdicts)

if __name__ == "__main__":
    raise SystemExit(main(BET))
