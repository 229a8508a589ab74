"""chat_cohort: the scale question on real heterogeneous users: 12 chat senders (data/corpora/chat/, BYU Chit-Chat).

The catalogue's open question is about "real-user heterogeneous data" (fragments, broken grammar, emoticons), which
the clean corpora barely have. On the 12 largest real chat senders: the 12 x 13 confusion matrix of norm adapters
(61-style) and norm vs LoRA-r4, each at the catalogue's lr 5e-5 and at the lr that bet lr_sensitivity chose on dev
text for that method (read from its committed result; no lr is chosen on these users' eval texts).
"""
from __future__ import annotations

from pathlib import Path

from sharedllm.bets.cells import confusion_outcomes, fmt, ppl, select, values
from sharedllm.bets.harness import Bet, grade, main

from .common import adapter_cells, in_fleets
from .figures import confusion_plot

USERS = ["chat/sender_549cc1d1", "chat/sender_31267496", "chat/sender_720840be", "chat/sender_0f9fe1f8",
         "chat/sender_afe2b8b4", "chat/sender_a54af4d5", "chat/sender_9c569478", "chat/sender_994e94a5",
         "chat/sender_95677b7a", "chat/sender_e33f6772", "chat/sender_842e34da", "chat/sender_5e5f6bde"]
QUICK_USERS = 3
CATALOGUE_LR = 5e-5
QUICK_TUNED = {"norm": 1e-2, "lora": 1e-3}  # --quick only: the tiny base has no lr_sensitivity result
HYPOTHESIS = ("On real chat users, each user's own norm adapter at its tuned lr beats every other chat user's norm "
              "adapter and the bare base by >= 5 % held-out ppl for >= 90 % of users.")
CRITERIA = {
    "margin": 0.05, "tuned_lr": "lr_sensitivity's dev-chosen lr per method (its committed result, same base)",
    "win": "own ppl <= (1 - margin) x min(every other user's norm adapter, base), pooled over the 3 eval texts, "
           "all adapters at the tuned norm lr",
    "STRICT": {"min_fraction_of_users_won": 0.9}, "LENIENT": {"above_fraction_of_users_won": 0.5},
    "CATASTROPHIC": {"max_fraction_of_users_won": 0.25},
    "side": "the same rule at the catalogue lr; LoRA-r4 vs norm per user at each lr",
}


def tuned_lrs(ctx) -> dict:
    if ctx.quick:
        ctx.notes["tuned_lr_source"] = "quick: fixed"
        return dict(QUICK_TUNED)
    from .lr_sensitivity import committed_tuned_lrs

    return committed_tuned_lrs(ctx, same_base=True)


def name(rel: str) -> str:
    return Path(rel).name


def run(ctx) -> list:
    users = USERS[:QUICK_USERS] if ctx.quick else USERS
    tuned = tuned_lrs(ctx)
    ctx.notes["tuned_lrs"] = tuned
    cells = []
    for u in users:
        cells += ctx.unit(f"base/{name(u)}", lambda u=u: ctx.score_cells(
            None, u, kind="confusion", adapter="base", user=name(u), lr=0.0))
    for lr in sorted({CATALOGUE_LR, tuned["norm"]}):
        key = lambda a, lr=lr: f"confusion/lr{lr:g}/{name(a)}"  # noqa: E731
        for a in in_fleets(ctx, f"lr{lr:g}", users, key, name, lr=lr):  # norm adapters --fleet users per pass
            cells += ctx.unit(key(a), lambda a=a, lr=lr: confusion_row(ctx, users, a, lr))
    for lr in sorted({CATALOGUE_LR, tuned["lora"]}):
        for u in users:
            cells += ctx.unit(f"lora/lr{lr:g}/{name(u)}", lambda u=u, lr=lr: lora_cells(ctx, u, lr))
    return cells


def confusion_row(ctx, users: list, a: str, lr: float) -> list:
    """User a's norm adapter at `lr` on every user's eval texts."""
    return adapter_cells(ctx, a, "norm", f"{name(a)}/norm/lr{lr:g}", lambda u, *_: {
        "kind": "confusion", "adapter": name(a), "user": name(u), "lr": lr}, on=users, lr=lr)


def lora_cells(ctx, u: str, lr: float) -> list:
    return adapter_cells(ctx, u, "lora", f"{name(u)}/lora/lr{lr:g}", lambda _, path, __: {
        "kind": "lora", "user": name(u), "lr": lr, "bytes": path.stat().st_size}, lr=lr)


def norm_lrs(cells: list) -> list:
    return sorted(x for x in values(cells, "lr", kind="confusion") if x > 0)


def matrix_at(cells: list, lr: float) -> list:
    """The confusion cells at one norm lr, with the base row."""
    return [c for c in select(cells, kind="confusion") if c["lr"] in (lr, 0.0)]


def won_fraction(cells: list, lr: float, margin: float) -> float:
    out = confusion_outcomes(matrix_at(cells, lr), margin)
    return sum(w for w, _ in out.values()) / len(out)


def tuned_of(lrs: list) -> float:
    return max(lrs, key=lambda x: x != CATALOGUE_LR)  # the tuned one when there are two, else the only one


def tuned_norm_lr(cells: list) -> float:
    return tuned_of(norm_lrs(cells))


def rule(f: float, criteria: dict) -> str:
    eps = 1e-9
    return grade(f >= criteria["STRICT"]["min_fraction_of_users_won"] - eps,
                 f > criteria["LENIENT"]["above_fraction_of_users_won"] + eps,
                 f <= criteria["CATASTROPHIC"]["max_fraction_of_users_won"] + eps)


def verdict(cells: list, criteria: dict) -> str:
    return rule(won_fraction(cells, tuned_norm_lr(cells), criteria["margin"]), criteria)


def side_verdicts(cells: list, criteria: dict) -> dict:
    return {"confusion_rule_at_catalogue_lr": rule(won_fraction(cells, CATALOGUE_LR, criteria["margin"]), criteria)}


def summary(cells: list) -> str:
    parts = []
    lora_lrs = sorted(values(cells, "lr", kind="lora"))
    pairs = [(CATALOGUE_LR, CATALOGUE_LR)] + [(tuned_norm_lr(cells), tuned_of(lora_lrs))]
    for lr, llr in list(dict.fromkeys(pairs)):
        conf = matrix_at(cells, lr)
        users = values(conf, "user")
        out = confusion_outcomes(conf, CRITERIA["margin"])
        own = {u: ppl(conf, user=u, adapter=u) for u in users}
        gain = [1 - own[u] / ppl(conf, user=u, adapter="base") for u in users]
        lead = [1 - own[u] / min(ppl(conf, user=u, adapter=a) for a in values(conf, "adapter", user=u)
                                 if a not in (u, "base")) for u in users]
        lora = sum(ppl(cells, kind="lora", user=u, lr=llr) < own[u] for u in users)
        lora_gain = [1 - ppl(cells, kind="lora", user=u, lr=llr) / ppl(conf, user=u, adapter="base") for u in users]
        parts.append(f"norm lr {lr:g}: own wins by >= 5 % for {sum(w for w, _ in out.values())}/{len(users)}, "
                     f"own best for {sum(b for _, b in out.values())}/{len(users)}, below base "
                     f"{_span(gain)}, ahead of best other {_span(lead)}; LoRA lr {llr:g} below base {_span(lora_gain)}, "
                     f"beats norm for {lora}/{len(users)}")
    return "; ".join(parts)


def _span(xs: list) -> str:
    return f"{100 * min(xs):.1f} to {100 * max(xs):.1f} %"


def plots(results: dict, folder: Path) -> list:
    """REPORT.md's heat map of the confusion matrix at the tuned norm lr."""
    r = results.get(BET.id)
    if r is None:
        return []
    cells = matrix_at(r["cells"], tuned_norm_lr(r["cells"]))
    return [confusion_plot(cells, BET.id, folder / "chat_confusion_matrix.png")]


BET = Bet(id="chat_cohort", slug="chat_cohort", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, side_verdicts=side_verdicts)

if __name__ == "__main__":
    raise SystemExit(main(BET))
