"""Bet 49: norm-only adapters Pareto-dominate LoRA-r4 and full fine-tuning (3 users x 3 methods)."""
from __future__ import annotations

from pathlib import Path

from sharedllm.bets.cells import fmt, one, ppl, select, values
from sharedllm.bets.common import GENERAL
from sharedllm.bets.harness import Bet, grade, main, not_run

from .common import USERS
from .figures import save

METHODS = ("norm", "lora", "full")
HYPOTHESIS = ("Per-user norm-only adapters Pareto-dominate LoRA-r4 and full fine-tuning at a fixed budget "
              "(100 steps, 2 x 256 tokens): lower held-out personal ppl, a smaller adapter, and general-text ppl "
              "no worse than the rival's within 5 %.")
CRITERIA = {
    "dominance": "norm personal ppl < rival's AND norm adapter bytes < rival's AND "
                 "norm general ppl <= (1 + general_tolerance) x rival's general ppl",
    "general_tolerance": 0.05, "rivals": ["lora", "full"],
    "STRICT": {"min_users_dominating_every_rival": 3},
    "LENIENT": {"min_users_dominating_every_rival": 2},
    "CATASTROPHIC": {"max_users_dominating_every_rival": 0},
}


def run(ctx) -> list:
    cells = []
    for user, rel in USERS.items():
        cells += ctx.score_cells(None, rel, user=user, method="none", eval="personal", bytes=0)
        for method in METHODS:
            path = ctx.adapter(rel, method)
            side = ctx.curve(f"{user}/{method}", path)
            size = path.stat().st_size
            cells += ctx.score_cells(path, rel, user=user, method=method, eval="personal", bytes=size,
                                     params=side["params"])
            cells += ctx.score_cells(path, GENERAL, user=user, method=method, eval="general", bytes=size,
                                     params=side["params"])
            ctx.release()
    cells += ctx.score_cells(None, GENERAL, user="-", method="none", eval="general", bytes=0)
    return cells


def dominates(cells: list, user: str, rival: str, tol: float, mine: str = "norm") -> bool:
    n, r = {"user": user, "method": mine}, {"user": user, "method": rival}
    return (ppl(cells, eval="personal", **n) < ppl(cells, eval="personal", **r)
            and one(cells, "bytes", **n) < one(cells, "bytes", **r)
            and ppl(cells, eval="general", **n) <= (1 + tol) * ppl(cells, eval="general", **r))


def winners(cells: list, criteria: dict, mine: str = "norm") -> list:
    users = [u for u in values(cells, "user", method="norm")]
    tol = criteria["general_tolerance"]
    return [u for u in users if all(dominates(cells, u, r, tol, mine) for r in criteria["rivals"])]


def judge(cells: list, criteria: dict, mine: str = "norm") -> str:
    k = len(winners(cells, criteria, mine))
    return grade(k >= criteria["STRICT"]["min_users_dominating_every_rival"],
                 k >= criteria["LENIENT"]["min_users_dominating_every_rival"],
                 k <= criteria["CATASTROPHIC"]["max_users_dominating_every_rival"])


def verdict(cells: list, criteria: dict) -> str:
    return judge(cells, criteria)


def controls(cells: list, criteria: dict) -> dict:
    """The bare base (0 bytes) in the norm adapter's place; its general-text cells (user "-") serve every user."""
    general = select(cells, method="none", eval="general")
    if not general or not select(cells, method="none", eval="personal"):
        return {"bare base": not_run("no base cells, method none")}
    lent = [{**c, "user": u} for u in values(cells, "user", method="norm") for c in general]
    return {"bare base": judge([c for c in cells if c not in general] + lent, criteria, "none")}


def summary(cells: list) -> str:
    parts = []
    for u in values(cells, "user", method="norm"):
        p = "/".join(fmt(ppl(cells, user=u, method=m, eval="personal")) for m in ("none",) + METHODS)
        g = "/".join(fmt(ppl(cells, user=u, method=m, eval="general")) for m in METHODS)
        parts.append(f"{u} personal ppl base/norm/lora/full {p}, general norm/lora/full {g}")
    k = len(winners(cells, CRITERIA))
    return f"norm dominates both rivals for {k}/{len(values(cells, 'user', method='norm'))} users; " + "; ".join(parts)


# ---- REPORT.md's plots ----

def plots(results: dict, folder: Path) -> list:
    """Loss curves and size vs quality, from this bet's result, else from 37's (49's programmer column)."""
    r = results.get(BET.id) or results.get("37")
    return [loss_plot(r, folder), pareto_plot(r, folder)] if r else []


def loss_plot(result: dict, folder: Path) -> Path:
    import matplotlib.pyplot as plt

    curves = result.get("extras", {}).get("loss_curves", {})
    methods = sorted({k.split("/")[1] for k in curves}, key=["norm", "lora", "full"].index)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], methods):
        for key, losses in curves.items():
            if key.split("/")[1] == m:
                ax.plot(range(1, len(losses) + 1), _smooth(losses), label=key.split("/")[0])
        ax.set_title(f"Bet {result['bet']}: {m} (5-step moving mean)")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (nats/token)")
    axes[0][0].legend()
    return save(fig, folder / "loss_curves.png")


def pareto_plot(result: dict, folder: Path) -> Path:
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c.get("eval", "personal") == "personal"]
    fig, ax = plt.subplots(figsize=(6, 4))
    marks = {"norm": "o", "lora": "s", "full": "^"}
    for k, user in enumerate(values(cells, "user", method="norm")):
        colour = f"C{k}"
        for m, mark in marks.items():
            size = select(cells, user=user, method=m)[0]["bytes"]
            ax.scatter(size, ppl(cells, user=user, method=m), marker=mark, color=colour,
                       label=f"{user} {m}")
        ax.axhline(ppl(cells, user=user, method="none"), color=colour, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("adapter file bytes (fp16, log scale)")
    ax.set_ylabel("held-out personal ppl")
    ax.set_title(f"Bet {result['bet']}: size vs quality (dotted: bare base)")
    ax.legend(fontsize=6, ncol=3)
    return save(fig, folder / "pareto.png")


def _smooth(xs: list, k: int = 5) -> list:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


BET = Bet(id="49", slug="adapter_shootout", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
