"""Constructed result cells for the bets' verdict functions: one builder per cell layout, numbers chosen by the test.

Every cell is scored over 100 tokens with nll = 100 ln(ppl), so a cell's ppl is the number given; pooled ppl over
several texts is their geometric mean."""
from __future__ import annotations

import math

from sharedllm.bets.catalogue import current
from sharedllm.bets.cells import scored
from sharedllm.bets.harness import get_bet

USERS3 = ("p", "n", "s")


def c(ppl_value: float, **cond) -> dict:
    return scored(math.log(ppl_value) * 100, 100, **cond)


def judge(bet_id: str, cells: list, **criteria) -> str:
    bet = get_bet(bet_id)
    return bet.verdict(cells, {**bet.criteria, **criteria})


def controls(bet_id: str, cells: list) -> dict:
    bet = get_bet(bet_id)
    return bet.controls(cells, bet.criteria)


def ternary(text_ratios: dict, size_ratio: float, fp: float = 10.0) -> list:
    """Bet 13: fp and ternary general-text ppl per eval text (ternary = ratio x fp), file bytes fp 8,000."""
    out = []
    for t, r in text_ratios.items():
        out += [c(fp, text=t, condition="fp", bytes=8000),
                c(fp * r, text=t, condition="ternary", bytes=round(8000 * size_ratio), bits_per_weight=1.6)]
    return out


def norm_full(ratio: float, size_ratio: float = 0.001, base_ratio: float | None = None, texts: int = 3) -> list:
    """Bet 37: norm ppl = ratio x full ppl (10) on every text; norm bytes = size_ratio x full bytes (100,000)."""
    out = []
    for t in range(texts):
        out += [c(10 * ratio, text=t, user="programmer", method="norm", bytes=round(100_000 * size_ratio)),
                c(10.0, text=t, user="programmer", method="full", bytes=100_000),
                c(10.5, text=t, user="programmer", method="lora", bytes=5_000)]
        if base_ratio is not None:
            out.append(c(10 * base_ratio, text=t, user="programmer", method="none", bytes=0))
    return out


def replication(holding: int, seeds: int = 5, texts: int = 3, base_ratio: float | None = None) -> list:
    """Bet 46: the first `holding` (seed, text) pairs have norm/full 1.5 (holds), the rest 2.5 (does not)."""
    out = []
    for seed in range(seeds):
        for t in range(texts):
            r = 1.5 if seed * texts + t < holding else 2.5
            out += [c(10 * r, method="norm", seed=seed, text=t, bytes=100),
                    c(10.0, method="full", seed=seed, text=t, bytes=100_000)]
    if base_ratio is not None:
        out += [c(10 * base_ratio, method="none", text=t, bytes=0) for t in range(texts)]
    return out


def shootout(norm_general: float = 20.0, norm_bytes: int = 10, users=USERS3, base_personal: float = 13.0,
             norm_personal: float = 10.0) -> list:
    """Bet 49: personal ppl norm/lora/full/none, general ppl norm/lora/full (the base's general cell has user '-')."""
    cells = []
    for user in users:
        for m, pers, gen, size in (("norm", norm_personal, norm_general, norm_bytes), ("lora", 11, 20, 100),
                                   ("full", 12, 20, 1000), ("none", base_personal, None, 0)):
            cells.append(c(pers, user=user, method=m, eval="personal", bytes=size))
            if gen is not None:
                cells.append(c(gen, user=user, method=m, eval="general", bytes=size))
    return cells + [c(20.0, user="-", method="none", eval="general", bytes=0)]


def ternary_users(improvements: list, random_improvements: list | None = None) -> list:
    """Bet 52: per user, ternary base ppl 100 and ternary + norm = 100 x (1 - improvement)."""
    out = []
    for i, (u, imp) in enumerate(zip(USERS3 + ("x", "y"), improvements)):
        out += [c(10.0, user=u, condition="fp_base"), c(100.0, user=u, condition="ternary_base"),
                c(100 * (1 - imp), user=u, condition="ternary_norm")]
        if random_improvements is not None:
            out.append(c(100 * (1 - random_improvements[i]), user=u, condition="ternary_random"))
    return out


def compress(int8_ratios: list, none_ppl: float = 11.0, delta_ratio: float = 1.0) -> list:
    """Bet 53: per user raw fp16 ppl 10, int8 = ratio x raw, the other schemes delta_ratio x raw, no adapter none_ppl."""
    out = []
    for u, r in zip(USERS3 + ("x",), int8_ratios):
        out += [c(none_ppl, user=u, scheme="none", bytes=0), c(10.0, user=u, scheme="float16", bytes=200),
                c(10 * r, user=u, scheme="int8", bytes=110)]
        out += [c(10 * delta_ratio, user=u, scheme=s, bytes=112) for s in ("int8-channel", "int8-delta")]
    return out


def pairs(mine: str, rival: str, per_user: list, rival_ppl: float = 10.0) -> list:
    """Bets 54 / 55 / 60: per user, `mine` ppl = factor x rival ppl (10); the base at 12."""
    out = []
    for u, f in zip(USERS3 + ("x",), per_user):
        out += [c(12.0, user=u, condition="base"), c(rival_ppl * f, user=u, condition=mine),
                c(rival_ppl, user=u, condition=rival)]
    return out


def steer(steer_ppls: list) -> list:
    """Bet 58: per user norm ppl 10, steer the given ppl, base 11."""
    out = []
    for u, s in zip(USERS3 + ("x",), steer_ppls):
        out += [c(11.0, user=u, method="none", bytes=0), c(10.0, user=u, method="norm", bytes=10),
                c(s, user=u, method="steer", bytes=2)]
    return out


def confusion(own: list, rival: float = 10.0, users=None, seeds=(0,), **extra) -> list:
    """Bets 61 / scale_protocol: users' own adapters at own[i] on their own text, every other adapter and the base
    at `rival`. Users default to p, n, s, ... one per entry of `own`."""
    if users is None:
        users = [f"u{i}" for i in range(len(own))] if len(own) > 3 else list(USERS3[:len(own)])
    own_of = dict(zip(users, own))
    out = [c(rival, adapter="base", user=u, seed=-1, **extra) for u in users]
    for seed in seeds:
        out += [c(own_of[u] if a == u else rival, adapter=a, user=u, seed=seed, **extra) for a in users for u in users]
    return out


def noise(margins: dict, users=USERS3, adapter: str = "own", base: bool = True) -> list:
    """Bet 63: margins = {sigma: ln(base ppl / adapter ppl)} for every user; base ppl 10 at every sigma."""
    out = []
    for u in users:
        for s, m in margins.items():
            out += [c(10.0, user=u, adapter="base", sigma_rel=s)] * base
            out.append(c(10.0 * math.exp(-m), user=u, adapter=adapter, sigma_rel=s))
    return out


def margins(m0: float, at_check: float, at_gone: float | None = None) -> dict:
    """Bet 63's sigmas: m0 up to 1e-4, at_gone at 1e-3 (default m0), m0 at 1e-2, at_check at 0.1, 0 at 1.0."""
    return {0.0: m0, 1e-4: m0, 1e-3: m0 if at_gone is None else at_gone, 1e-2: m0, 0.1: at_check, 1.0: 0.0}


def lr_grid(won: int = 3, general: float = 1.0, tuned: float = 2e-3, users=USERS3) -> list:
    """lr_sensitivity: every grid cell (dev ppl 9 at norm's `tuned` lr and at every rival lr, 9.5 elsewhere; base 10),
    general ppl = general x the base's 20, and the confusion matrix at `tuned`: own 9.0 for the first `won` users,
    9.8 (best, but by < 5 %) for the rest, every other adapter and the base 10."""
    grid = current().module("lr_sensitivity").GRID
    out = [c(20.0, kind="grid", user="-", method="none", lr=0.0, eval="general")]
    for u in users:
        out += [c(10.0, kind="grid", user=u, method="none", lr=0.0, eval=e, text=0) for e in ("dev", "personal")]
    for m, lrs in grid.items():
        for lr in lrs:
            dev, tag = 9.0 if m != "norm" or lr == tuned else 9.5, {"kind": "grid", "method": m, "lr": lr}
            for u in users:
                out += [c(dev, user=u, eval="dev", text=0, bytes=len(m), **tag),
                        c(9.0, user=u, eval="personal", bytes=len(m), **tag),
                        c(20.0 * general, user=u, eval="general", bytes=len(m), **tag)]
    own = dict(zip(users, [9.0] * won + [9.8] * len(users)))
    for a in ("base",) + tuple(users):
        out += [c(own[u] if a == u else 10.0, kind="confusion", adapter=a, user=u, lr=tuned) for u in users]
    return out
