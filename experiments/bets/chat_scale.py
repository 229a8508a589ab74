"""chat_scale: bet chat_cohort's 12 real chat senders on a larger base, each method at the lr chosen on THAT base's
dev slices (issue 31, item 1; pre-registered 2026-12-07 before any unit ran, first on qwen2.5-coder-0.5b).

chat_cohort (135M) took its tuned lrs from lr_sensitivity's result on the default base; the scale protocol transferred
the same lrs to 0.5B and 1.5B, which the recompute of issue 31 found hurts LoRA. Here each method's lr is chosen on this
base: a small grid per method, trained for 3 dev senders and scored on their dev slices only (the 2,048 held-out tokens
after their three eval texts: `sharedllm.data.dev_slice`; disjoint from the eval texts and from the training pool).
The chat corpus has exactly the 12 senders of the cohort, so no sender outside it exists: the dev senders are 3 of the
12, and only their dev slices are read for the choice (the config records this). Then, at the chosen lrs only:

1. the 12 x 13 confusion matrix of norm adapters (every sender's own norm adapter on every sender's eval texts, and
   the bare base): the verdict, by chat_cohort's rule;
2. the same matrix for LoRA-r4 (is LoRA itself user-specific?), a side verdict; LoRA adapters are trained one at a
   time (norm ones in fleets, `--fleet`);
3. general-text ppl (data/corpora/general, its three eval texts) of every own adapter, both methods, against the
   base's: a side verdict applies lr_sensitivity's general-text bounds to the norm verdict;
4. the random-token control per method: an adapter trained at the same lr on uniform random tokens (as many as the
   sender's training pool) in the own adapter's place in that method's matrix, by the same rule.

The catalogue lr arm (5e-5) is not run here (LoRA's 5e-5 is a grid point of the screen; the 0.5B scale protocol has
the catalogue arm on the clean corpora). The units run in the order above, screen first, so each lands as a
checkpoint (results/other/<base>-bf16/partial/chat_scale.json) that a later run resumes.

On qwen2.5-coder-1.5b the run has 6 senders (SENDERS; fixed 2026-12-07 before any 1.5B unit ran, for the budget):
a verdict on 6 is at most LENIENT, and the report puts the 0.5B run's sub-matrix of the same 6 senders beside it.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from sharedllm.bets.cells import confusion_outcomes, one, ppl, scored, select, values
from sharedllm.bets.common import GENERAL
from sharedllm.bets.harness import grade, main, not_run
from sharedllm.bets.spec import Bet

from .chat_cohort import QUICK_USERS, USERS, name
from .common import in_fleets

METHODS = ("norm", "lora")
GRID = {"norm": [5e-4, 2e-3, 5e-3], "lora": [5e-5, 2e-4, 1e-3]}
# fixed before running: the largest, a middle and the smallest training pool of the 12 (qwen2.5 tokenizer: 81,142 /
# 63,292 / 36,013 training tokens)
DEV_USERS = ["chat/sender_0f9fe1f8", "chat/sender_9c569478", "chat/sender_e33f6772"]
# senders per base where the budget does not fit all 12, fixed before any unit ran on that base (issue 31: "at 1.5B as
# many as the budget allows (at least 6)"): the 3 dev senders and the first 3 others in the cohort's order
SENDERS = {"qwen2.5-coder-1.5b": [u for u in USERS if u in DEV_USERS or u in USERS[:3]]}
SENDERS_NOTE = ("6 of the 12 senders on this base (budget: ~20 CPU-h on a 2-core machine; issue 31 asks for at least "
                "6 at 1.5B): the 3 dev senders and the first 3 others in the cohort's order, fixed before any unit "
                "ran on it. STRICT needs all 12 senders, so a verdict on 6 is at most LENIENT; each rival set has 5 "
                "other senders instead of 11 (an easier win: the report sets 0.5B on the same 6 beside it)")
DEV_NOTE = ("data/corpora/chat holds exactly the cohort's 12 senders, so the dev senders are 3 of the 12 eval senders; "
            "the lr choice reads only their dev slices (held-out tokens after their three eval texts), never an eval "
            "text")
HYPOTHESIS = ("On this base, with each method's lr chosen on this base's dev slices, each real chat sender's own norm "
              "adapter beats every other chat sender's norm adapter and the bare base by >= 5 % held-out ppl for "
              ">= 90 % of the 12 senders.")
CRITERIA = {
    "margin": 0.05, "grid": GRID, "dev_users": [name(u) for u in DEV_USERS],
    "lr_choice": "per method, the grid lr with the lowest mean over the dev senders of log(dev ppl / base dev ppl); "
                 "ties -> the smaller lr; dev = each dev sender's 2,048 held-out tokens after its three eval texts; "
                 "a choice at the grid's edge is reported as such, the grid is not extended in this version",
    "win": "own ppl <= (1 - margin) x min(every other sender's adapter of the same method, base), pooled over the 3 "
           "eval texts, every adapter at that method's chosen lr",
    "verdict_on": "norm at its chosen lr",
    "STRICT": {"min_fraction_of_users_won": 0.9, "users": len(USERS)},
    "LENIENT": {"above_fraction_of_users_won": 0.5},
    "CATASTROPHIC": {"max_fraction_of_users_won": 0.25},
    "side": {"lora": "the same rule on LoRA-r4's own confusion matrix at its chosen lr",
             "general": "the verdict's rule plus lr_sensitivity's general-text bounds on every own norm adapter "
                        "(general ppl / base's): STRICT also <= 1.05, LENIENT also <= 1.10, CATASTROPHIC also if any "
                        "> 1.25"},
    "general_bounds": {"STRICT": 1.05, "LENIENT": 1.10, "CATASTROPHIC": 1.25},
    "controls": "per method: the adapter trained at the same lr on uniform random tokens (as many as the sender's "
                "training pool) in the own adapter's place in that method's matrix, by the same rule",
    "expected": "not judged, written before running: FAIL or CATASTROPHIC at 0.5B (the clean corpora's 0.5B tuned arm: "
                "1/12 won; these senders at 135M: 7/12)",
}
EPS = 1e-9


# ---- the run: screen (dev slices), then the cohort at the chosen lrs ----

def senders(ctx) -> list:
    """The senders of this run: the quick three, the base's pre-registered subset, or all 12."""
    return USERS[:QUICK_USERS] if ctx.quick else SENDERS.get(ctx.base_name, USERS)


def run(ctx) -> list:
    users = senders(ctx)
    if len(users) < len(USERS) and not ctx.quick:
        ctx.notes["senders"] = {"used": [name(u) for u in users], "note": SENDERS_NOTE}
    ctx.notes.update({"dev_users": [name(u) for u in DEV_USERS], "dev_users_note": DEV_NOTE, "grid": GRID,
                      "catalogue_lr_arm": "not run (LoRA's 5e-5 is a grid point of the dev screen)",
                      "lora_training": "LoRA adapters trained one at a time (no LoRA fleets)"})
    cells = screen(ctx)
    if ctx.deferred:  # enumerating units for Ray with screen units still to compute: the choice needs them all
        return cells
    lrs = {m: chosen_lr(cells, m) for m in METHODS}
    ctx.notes["chosen_lrs"] = lrs
    ctx.notes["dev_scores"] = {m: {f"{lr:g}": round(dev_score(cells, m, lr), 6) for lr in GRID[m]} for m in METHODS}
    cells += base_rows(ctx, users)
    cells += norm_matrix(ctx, users, lrs["norm"])
    cells += lora_matrix(ctx, users, lrs["lora"])
    cells += random_norm(ctx, users, lrs["norm"])
    return cells + random_lora(ctx, users, lrs["lora"])


def screen(ctx) -> list:
    """The base's and each grid adapter's ppl on the dev senders' dev slices (and on general text's dev slice,
    recorded, not used by the choice)."""
    def base() -> list:
        out = [scored(*ctx.score_dev(None, u), kind="dev", method="none", lr=0.0, adapter="base", user=name(u))
               for u in DEV_USERS]
        return out + [scored(*ctx.score_dev(None, GENERAL), kind="dev", method="none", lr=0.0, adapter="base",
                             user="general")]
    cells = ctx.unit("dev/base", base)
    for method in METHODS:
        for lr in GRID[method]:
            for u in DEV_USERS:
                cells += ctx.unit(f"dev/{method}/lr{lr:g}/{name(u)}", lambda m=method, x=lr, u=u:
                                  screen_unit(ctx, u, m, x))
    return cells


def screen_unit(ctx, u: str, method: str, lr: float) -> list:
    path = ctx.adapter(u, method, lr=lr)
    side = ctx.curve(f"{name(u)}/{method}/lr{lr:g}", path)
    tag = {"kind": "dev", "method": method, "lr": lr, "adapter": name(u)}
    cells = [scored(*ctx.score_dev(path, u), user=name(u), bytes=path.stat().st_size, params=side["params"],
                    train_s=round(side["wall_s"], 1), **tag),
             scored(*ctx.score_dev(path, GENERAL), user="general", **tag)]
    ctx.release()
    return cells


def base_rows(ctx, users: list) -> list:
    cells = []
    for u in users:
        cells += ctx.unit(f"base/{name(u)}", lambda u=u: ctx.score_cells(
            None, u, kind="confusion", method="none", adapter="base", user=name(u), lr=0.0))
    return cells + ctx.unit("base/general", lambda: ctx.score_cells(
        None, GENERAL, kind="general", method="none", adapter="base", user="general", lr=0.0))


def matrix_row(ctx, users: list, a: str, method: str, lr: float) -> list:
    """Sender a's adapter on every sender's eval texts and on general text; a's own cells carry its footprint."""
    path = ctx.adapter(a, method, lr=lr)
    side = ctx.curve(f"{name(a)}/{method}/lr{lr:g}", path)
    cells = []
    for u in users:
        own = {"bytes": path.stat().st_size, "params": side["params"], "train_s": round(side["wall_s"], 1)} \
            if u == a else {}
        cells += ctx.score_cells(path, u, kind="confusion", method=method, adapter=name(a), user=name(u), lr=lr,
                                 **own)
    cells += ctx.score_cells(path, GENERAL, kind="general", method=method, adapter=name(a), user="general", lr=lr)
    ctx.release()
    return cells


def norm_matrix(ctx, users: list, lr: float) -> list:
    cells, key = [], lambda a: f"confusion/norm/lr{lr:g}/{name(a)}"  # noqa: E731
    for a in in_fleets(ctx, f"norm/lr{lr:g}", users, key, name, lr=lr):  # --fleet users per pass
        cells += ctx.unit(key(a), lambda a=a: matrix_row(ctx, users, a, "norm", lr))
    return cells


def lora_matrix(ctx, users: list, lr: float) -> list:
    cells = []
    for a in users:
        cells += ctx.unit(f"confusion/lora/lr{lr:g}/{name(a)}", lambda a=a: matrix_row(ctx, users, a, "lora", lr))
    return cells


def random_cells(ctx, u: str, method: str, lr: float) -> list:
    path = ctx.adapter(u, method, tag="_random", tokens=ctx.random_tokens(u), lr=lr)
    cells = ctx.score_cells(path, u, kind="random", method=method, user=name(u), lr=lr)
    ctx.release()
    return cells


def random_norm(ctx, users: list, lr: float) -> list:
    cells, key = [], lambda u: f"random/norm/lr{lr:g}/{name(u)}"  # noqa: E731
    for u in in_fleets(ctx, f"random/lr{lr:g}", users, key, name, lr=lr, tag="_random", tokens=ctx.random_tokens):
        cells += ctx.unit(key(u), lambda u=u: random_cells(ctx, u, "norm", lr))
    return cells


def random_lora(ctx, users: list, lr: float) -> list:
    cells = []
    for u in users:
        cells += ctx.unit(f"random/lora/lr{lr:g}/{name(u)}", lambda u=u: random_cells(ctx, u, "lora", lr))
    return cells


# ---- pure functions of the cells: the lr choice, the verdicts, the summary ----

def dev_score(cells: list, method: str, lr: float) -> float:
    """Mean over the dev senders of log(dev ppl / base dev ppl): what the lr choice minimises."""
    dev = select(cells, kind="dev")
    users = [name(u) for u in DEV_USERS]
    return sum(math.log(ppl(dev, method=method, lr=lr, adapter=u, user=u) / ppl(dev, adapter="base", user=u))
               for u in users) / len(users)


def chosen_lr(cells: list, method: str) -> float:
    return min(GRID[method], key=lambda lr: (round(dev_score(cells, method, lr), 12), lr))


def matrix(cells: list, method: str) -> list:
    """The method's confusion cells with the base rows; checks they are at the lr the dev cells choose."""
    conf = select(cells, kind="confusion", method=method)
    lr = chosen_lr(cells, method)
    assert values(conf, "lr") == [lr], f"{method} matrix at {values(conf, 'lr')}, the dev slices choose {lr:g}"
    return conf + select(cells, kind="confusion", method="none")


def won_fraction(conf: list, margin: float) -> float:
    out = confusion_outcomes(conf, margin)
    return sum(w for w, _ in out.values()) / len(out)


def rule(conf: list, criteria: dict, general: float | None = None) -> str:
    """chat_cohort's tiers on a confusion matrix; STRICT needs every declared sender; with `general` (the worst own
    adapter's general-text ratio), lr_sensitivity's general-text bounds too."""
    f, b = won_fraction(conf, criteria["margin"]), criteria["general_bounds"]
    g = 1.0 if general is None else general
    return grade(f >= criteria["STRICT"]["min_fraction_of_users_won"] - EPS
                 and len(values(conf, "user")) >= criteria["STRICT"]["users"] and g <= b["STRICT"],
                 f > criteria["LENIENT"]["above_fraction_of_users_won"] + EPS and g <= b["LENIENT"],
                 f <= criteria["CATASTROPHIC"]["max_fraction_of_users_won"] + EPS or g > b["CATASTROPHIC"])


def general_ratios(cells: list, method: str) -> dict:
    base = ppl(cells, kind="general", method="none")
    return {a: ppl(cells, kind="general", method=method, adapter=a) / base
            for a in values(cells, "adapter", kind="general", method=method)}


def verdict(cells: list, criteria: dict) -> str:
    return rule(matrix(cells, "norm"), criteria)


def side_verdicts(cells: list, criteria: dict) -> dict:
    return {f"LoRA-r4's own confusion matrix at its dev-chosen lr {chosen_lr(cells, 'lora'):g}":
            rule(matrix(cells, "lora"), criteria),
            "norm with lr_sensitivity's general-text bounds":
            rule(matrix(cells, "norm"), criteria, max(general_ratios(cells, "norm").values()))}


def random_as_own(cells: list, method: str) -> list:
    """The method's matrix with each sender's own adapter replaced by its random-token adapter, on the eval texts of
    the senders that have one."""
    rand = select(cells, kind="random", method=method)
    users = values(rand, "user")
    conf = [c for c in matrix(cells, method) if c["adapter"] != c["user"] and c["user"] in users]
    return conf + [{**c, "kind": "confusion", "adapter": c["user"]} for c in rand]


def controls(cells: list, criteria: dict) -> dict:
    out = {}
    for method, label in (("norm", "norm"), ("lora", "LoRA-r4")):
        key = f"{label} adapter of random tokens as the sender's own"
        out[key] = rule(random_as_own(cells, method), criteria) if select(cells, kind="random", method=method) \
            else not_run(f"no random-token cells for {method}")
    return out


def _span(xs: list) -> str:
    return f"{100 * min(xs):.1f} to {100 * max(xs):.1f} %"


def _method_line(cells: list, method: str) -> str:
    conf, lr = matrix(cells, method), chosen_lr(cells, method)
    users = values(select(conf, method=method), "user")
    out = confusion_outcomes(conf, CRITERIA["margin"])
    own = {u: ppl(conf, user=u, adapter=u) for u in users}
    gain = [1 - own[u] / ppl(conf, user=u, adapter="base") for u in users]
    lead = [1 - own[u] / min(ppl(conf, user=u, adapter=a) for a in values(conf, "adapter", user=u)
                             if a not in (u, "base")) for u in users]
    edge = " (grid edge)" if lr in (min(GRID[method]), max(GRID[method])) else ""
    parts = [f"{method} lr {lr:g}{edge}: own wins by >= 5 % for {sum(w for w, _ in out.values())}/{len(users)}, own "
             f"best for {sum(b for _, b in out.values())}/{len(users)}, below base {_span(gain)}, ahead of best other "
             f"{_span(lead)}"]
    general = general_ratios(cells, method)
    if general:
        parts.append(f"general x{min(general.values()):.3f} to x{max(general.values()):.3f}")
    rand = values(cells, "user", kind="random", method=method)
    if rand:
        real = [1 - own[u] / ppl(cells, kind="random", method=method, user=u) for u in rand]
        parts.append(f"real vs random-token adapter {_span(real)} ({len(rand)} senders)")
    return ", ".join(parts)


def summary(cells: list) -> str:
    dev = "; ".join(f"{m} " + "/".join(f"{lr:g}:{dev_score(cells, m, lr):+.3f}" for lr in GRID[m]) for m in METHODS)
    users = values(select(cells, kind="confusion", method="lora"), "user")
    lora = sum(ppl(cells, kind="confusion", method="lora", adapter=u, user=u)
               < ppl(cells, kind="confusion", method="norm", adapter=u, user=u) for u in users)
    sizes = {m: one(cells, "bytes", kind="dev", method=m, adapter=name(DEV_USERS[0]), lr=GRID[m][0]) for m in METHODS}
    return (f"lr chosen on {len(DEV_USERS)} dev senders' dev slices (mean log dev ppl ratio to the base) {dev}; "
            + "; ".join(_method_line(cells, m) for m in METHODS)
            + f"; LoRA beats norm for {lora}/{len(users)}; bytes norm {sizes['norm']:,}, LoRA {sizes['lora']:,}")


# ---- REPORT.md: the chat cohort across sizes (chat_cohort at 135M, this bet on each larger base) ----

SIZES = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")  # the larger bases issue 31 asks for
COLUMNS = ("base", "bet (lr source)", "status", "norm lr", "norm: own wins >= 5 %", "norm own vs base",
           "norm own vs best other", "general (worst own norm)", "LoRA-r4 lr", "LoRA: own wins >= 5 %",
           "LoRA vs base", "LoRA beats norm", "real norm vs random-token norm")


def _median(xs: list) -> str:
    return f"{100 * statistics.median(xs):+.1f} % ({100 * min(xs):+.1f} to {100 * max(xs):+.1f})"


def matrix_numbers(conf: list) -> dict:
    """A confusion matrix's per-user numbers: wins, own ppl, gain over the base, lead over the best other adapter."""
    users = values(select(conf, adapter="base"), "user")
    own = {u: ppl(conf, user=u, adapter=u) for u in users}
    lead = [1 - own[u] / min(ppl(conf, user=u, adapter=a) for a in values(conf, "adapter", user=u)
                             if a not in (u, "base")) for u in users]
    won = sum(w for w, _ in confusion_outcomes(conf, CRITERIA["margin"]).values())
    return {"users": users, "own": own, "won": f"{won}/{len(users)}", "lead": _median(lead),
            "gain": _median([1 - own[u] / ppl(conf, user=u, adapter="base") for u in users])}


def complete(cells: list, method: str) -> bool:
    """The method's matrix has a row for every sender with a base row (a checkpoint may hold only some)."""
    users = set(values(select(cells, kind="confusion", method="none"), "user"))
    return bool(users) and set(values(select(cells, kind="confusion", method=method), "adapter")) >= users


def dev_done(cells: list, method: str) -> bool:
    """Every grid lr's dev units are in (each: the dev sender's slice and general text's), with the base's."""
    return len(select(cells, kind="dev", method=method)) == 2 * len(GRID[method]) * len(DEV_USERS) \
        and bool(select(cells, kind="dev", method="none"))


def scale_row(run) -> dict:
    """One chat_scale run (a result, or a checkpoint: what its units already show) as a row of the table."""
    cells, row = run.cells, {"base": run.base, "bet (lr source)": "chat_scale (dev-slice grid on this base)"}
    if run.partial:
        dev = sum(dev_done(cells, m) for m in METHODS)
        row["status"] = f"partial: {len(run.units)} units (dev screen {dev}/{len(METHODS)} methods)"
    else:
        row["status"] = f"**{run.result['verdict']}** ({run.dtype})"
    for m, label in (("norm", "norm"), ("lora", "LoRA-r4")):
        if not dev_done(cells, m):
            done = [lr for lr in GRID[m] if len(select(cells, kind="dev", method=m, lr=lr)) == 2 * len(DEV_USERS)]
            row[f"{label} lr"] = "dev: " + (", ".join(f"{lr:g} {dev_score(cells, m, lr):+.3f}" for lr in done)
                                            or "none yet")
            continue
        lr = chosen_lr(cells, m)
        row[f"{label} lr"] = f"{lr:g}" + (" (grid edge)" if lr in (min(GRID[m]), max(GRID[m])) else "")
        if complete(cells, m):
            numbers = matrix_numbers(matrix(cells, m))
            if m == "norm":
                row.update({"norm: own wins >= 5 %": numbers["won"], "norm own vs base": numbers["gain"],
                            "norm own vs best other": numbers["lead"]})
                general = general_ratios(cells, "norm")
                row["general (worst own norm)"] = f"x{max(general.values()):.3f}" if general else ""
            else:
                row.update({"LoRA: own wins >= 5 %": numbers["won"], "LoRA vs base": numbers["gain"]})
    if complete(cells, "norm") and complete(cells, "lora") and dev_done(cells, "lora"):
        users = values(select(cells, kind="confusion", method="lora"), "user")
        wins = sum(ppl(cells, kind="confusion", method="lora", adapter=u, user=u)
                   < ppl(cells, kind="confusion", method="norm", adapter=u, user=u) for u in users)
        row["LoRA beats norm"] = f"{wins}/{len(users)}"
    rand = values(cells, "user", kind="random", method="norm")
    if rand and complete(cells, "norm") and dev_done(cells, "norm"):
        own = {u: ppl(cells, kind="confusion", method="norm", adapter=u, user=u) for u in rand}
        row["real norm vs random-token norm"] = _median([1 - own[u] / ppl(cells, kind="random", method="norm", user=u)
                                                         for u in rand])
    return row


def on_senders(run, users: set):
    """`run` restricted to `users`: their eval texts scored by their adapters and the base (and their general-text
    and random-token cells; the dev cells unchanged): a like-for-like row beside a base that ran fewer senders."""
    def kept(c: dict) -> bool:
        kind = c.get("kind")
        return kind == "dev" or (c.get("user") in users if kind == "random" else
                                 c.get("user") in users | {"general"} and c.get("adapter") in users | {"base"})
    return run._replace(cells=[c for c in run.cells if kept(c)], result=None)


def like_for_like_rows(runs: list) -> list:
    """For each run on fewer senders, every other chat_scale run restricted to the same senders."""
    rows = []
    for few in runs:
        users = set(values(select(few.cells, kind="confusion", method="none"), "user"))
        if not users or len(users) >= len(USERS):
            continue
        for run in runs:
            if run is few:
                continue
            sub = on_senders(run, users)
            done = complete(sub.cells, "norm") and dev_done(sub.cells, "norm")
            verdict = rule(matrix(sub.cells, "norm"), CRITERIA) if done else "matrix not complete"
            row = scale_row(sub)
            rows.append({**row, "base": f"{run.base} (on {few.base}'s {len(users)} senders)",
                         "bet (lr source)": "chat_scale, sub-matrix of the same senders",
                         "status": f"sub-matrix: {verdict}"})
    return rows


def cohort_row(run) -> dict:
    """chat_cohort's result (the default base, lr_sensitivity's tuned lrs transferred) in the same columns."""
    from .chat_cohort import matrix_at, tuned_norm_lr

    cells = run.cells
    if run.partial:
        return {"base": run.base, "bet (lr source)": "chat_cohort", "status": f"partial: {len(run.units)} units"}
    lr = tuned_norm_lr(cells)
    numbers = matrix_numbers(matrix_at(cells, lr))
    lora = run.result["config"].get("tuned_lrs", {}).get("lora")
    lora_ppl = {u: ppl(cells, kind="lora", user=u, lr=lora) for u in numbers["users"]} if lora else {}
    row = {"base": run.base, "bet (lr source)": "chat_cohort (lr_sensitivity's tuned lrs)",
           "status": f"**{run.result['verdict']}** ({run.dtype})", "norm lr": f"{lr:g}",
           "norm: own wins >= 5 %": numbers["won"], "norm own vs base": numbers["gain"],
           "norm own vs best other": numbers["lead"], "general (worst own norm)": "not scored",
           "LoRA-r4 lr": f"{lora:g}" if lora else "", "LoRA: own wins >= 5 %": "not measured",
           "real norm vs random-token norm": "not run"}
    if lora_ppl:
        base = {u: ppl(cells, kind="confusion", adapter="base", user=u) for u in numbers["users"]}
        row["LoRA vs base"] = _median([1 - lora_ppl[u] / base[u] for u in numbers["users"]])
        row["LoRA beats norm"] = f"{sum(lora_ppl[u] < numbers['own'][u] for u in numbers['users'])}/{len(lora_ppl)}"
    return row


def report_section(results_dir: Path, plots_dir: Path, root: Path) -> list:
    """REPORT.md's chat-cohort section: the 12 real chat senders at each size, finished or as far as checkpointed."""
    from sharedllm.bets.report import runs_of

    runs = runs_of(results_dir, "chat_scale")
    rows = [cohort_row(r) for r in runs_of(results_dir, "chat_cohort")] + [scale_row(r) for r in runs]
    rows += like_for_like_rows(runs)
    rows += [{"base": b, "bet (lr source)": "chat_scale", "status": "not run yet"} for b in SIZES
             if b not in {r.base for r in runs}]
    lines = ["", "## The chat cohort across sizes", "",
             "The 12 real chat senders (data/corpora/chat): each sender's own adapter against every other sender's "
             "adapter of the same method and the bare base, on that sender's three held-out eval texts; a win is "
             ">= 5 % lower ppl than every rival. Percentages: median (range) over senders of 1 - ppl(own) / "
             "ppl(comparison). chat_cohort took the default base's lrs from lr_sensitivity; chat_scale chooses each "
             "method's lr on the base's own dev slices (3 dev senders). A run in progress shows what its checkpointed "
             "units already give (an lr choice needs every dev unit, a matrix every row; blank: not yet).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]


BET = Bet(id="chat_scale", slug="chat_scale", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, side_verdicts=side_verdicts, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
