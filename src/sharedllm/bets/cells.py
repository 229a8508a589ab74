"""Pure helpers over result cells (flat dicts), shared by every bet's verdict and summary.

A scored cell carries `nll` (summed nats) and `tokens` (predicted tokens); perplexity over a set of cells is
pooled: exp(sum nll / sum tokens), i.e. the token ppl of the concatenated eval texts in the stated windows.
"""
from __future__ import annotations

import math


def select(cells: list, **where) -> list:
    return [c for c in cells if all(c.get(k) == v for k, v in where.items())]


def ppl(cells: list, **where) -> float:
    rows = select(cells, **where)
    if not rows:
        raise KeyError(f"no cells match {where}")
    return math.exp(sum(c["nll"] for c in rows) / sum(c["tokens"] for c in rows))


def values(cells: list, key: str, **where) -> list:
    """The distinct values of `key` among matching cells, in first-seen order."""
    out = []
    for c in select(cells, **where):
        if key in c and c[key] not in out:
            out.append(c[key])
    return out


def one(cells: list, key: str, **where):
    rows = [c[key] for c in select(cells, **where) if key in c]
    if len(set(map(str, rows))) != 1:
        raise KeyError(f"expected one value of {key} for {where}, found {rows[:4]}")
    return rows[0]


def beats(ppl_a: float, ppl_b: float, margin: float) -> bool:
    """a beats b by at least `margin` (relative): ppl_a <= (1 - margin) * ppl_b."""
    return ppl_a <= (1.0 - margin) * ppl_b


def scored(nll: float, tokens: int, **condition) -> dict:
    return {**condition, "nll": nll, "tokens": tokens, "ppl": math.exp(nll / tokens)}


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.3e}"


def confusion_outcomes(cells: list, margin: float, **where) -> dict:
    """For each eval user: (own adapter beats every other adapter and the base by >= margin, own is best).

    Cells carry `adapter` (a user name, or "base") and `user` (whose eval text was scored)."""
    out = {}
    for u in values(cells, "user", **where):
        own = ppl(cells, user=u, adapter=u, **where)
        rivals = [ppl(cells, user=u, adapter=a, **where) for a in values(cells, "adapter", user=u, **where) if a != u]
        out[u] = (all(beats(own, r, margin) for r in rivals), all(own < r for r in rivals))
    return out


def best_other_adapter(cells: list, user: str) -> float:
    """The lowest ppl on `user`'s text among the other users' adapters (not own, not the base)."""
    return min(ppl(cells, user=user, adapter=a) for a in values(cells, "adapter", user=user) if a not in (user, "base"))


def head_to_head(cells: list, margin: float, mine: str, rival: str, ties_lose: bool = False) -> tuple[int, int]:
    """Per user: does condition `mine` beat `rival` by >= margin (won), and does `rival` beat `mine` (lost)?"""
    won = lost = 0
    for u in values(cells, "user"):
        a, b = ppl(cells, user=u, condition=mine), ppl(cells, user=u, condition=rival)
        won, lost = won + beats(a, b, margin), lost + ((b <= a) if ties_lose else (b < a))
    return won, lost


def per_user_ppl(cells: list, conditions: tuple) -> str:
    """'user a/b/c ppl1/ppl2/ppl3; ...' for a summary line."""
    return "; ".join(f"{u} {'/'.join(conditions)} {'/'.join(fmt(ppl(cells, user=u, condition=c)) for c in conditions)}"
                     for u in values(cells, "user"))
