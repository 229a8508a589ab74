"""Bet 63: the norm adapter's gain survives Gaussian noise on every block's output."""
from __future__ import annotations

import math

from sharedllm.bets.cells import fmt, ppl, select, values
from sharedllm.bets.harness import Bet, grade, main, not_run
from sharedllm.bets.probes import block_noise

from .common import USERS

SIGMAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HYPOTHESIS = ("A user's norm adapter keeps its advantage over the base when every block's output hidden state "
              "gets Gaussian noise of std sigma_rel x RMS(hidden): at sigma_rel = 0.1 it keeps >= 50 % of its "
              "noiseless margin.")
CRITERIA = {
    "margin": "ln(base ppl) - ln(own ppl) at a given sigma_rel (nats per token; own and base see the same "
              "standard-normal draws)",
    "sigmas": list(SIGMAS), "check_sigma": 0.1, "keep_fraction": 0.5, "gone_sigma": 1e-3,
    "win": "margin(check_sigma) > 0 and margin(check_sigma) >= keep_fraction x margin(0)",
    "STRICT": {"min_users_won": 3}, "LENIENT": {"min_users_won": 2},
    "CATASTROPHIC": {"min_users_margin_gone_at_gone_sigma": 2},
}


def noise(sigma: float):
    return lambda model, idx: block_noise(model, sigma, seed=1000 + idx)


def run(ctx) -> list:
    cells, users = [], list(USERS)
    for i, (user, rel) in enumerate(USERS.items()):
        other = users[(i + 1) % len(users)]  # the control "another user's adapter": the next user's
        adapters = {"own": ctx.adapter(rel, "norm"), "other": ctx.adapter(USERS[other], "norm"),
                    "random": ctx.adapter(rel, "norm", tag="_random", tokens=ctx.random_tokens(rel))}
        for sigma in SIGMAS:
            probe, wrap = (f"noise{sigma:g}", noise(sigma)) if sigma else ("", None)
            cells += ctx.score_cells(None, rel, probe=probe, wrap=wrap, user=user, adapter="base", sigma_rel=sigma)
            for name, path in adapters.items():
                tag = {"source": other} if name == "other" else {}
                cells += ctx.score_cells(path, rel, probe=probe, wrap=wrap, user=user, adapter=name, sigma_rel=sigma,
                                         **tag)
        ctx.release()
    return cells


def margin(cells: list, user: str, sigma: float, mine: str = "own") -> float:
    return (math.log(ppl(cells, user=user, adapter="base", sigma_rel=sigma))
            - math.log(ppl(cells, user=user, adapter=mine, sigma_rel=sigma)))


def counts(cells: list, criteria: dict, mine: str = "own") -> tuple[int, int]:
    won = gone = 0
    for u in values(cells, "user"):
        m0, mc = margin(cells, u, 0.0, mine), margin(cells, u, criteria["check_sigma"], mine)
        won += mc > 0 and mc >= criteria["keep_fraction"] * m0
        gone += margin(cells, u, criteria["gone_sigma"], mine) <= 0
    return won, gone


def judge(cells: list, criteria: dict, mine: str = "own") -> str:
    won, gone = counts(cells, criteria, mine)
    return grade(won >= criteria["STRICT"]["min_users_won"], won >= criteria["LENIENT"]["min_users_won"],
                 gone >= criteria["CATASTROPHIC"]["min_users_margin_gone_at_gone_sigma"])


def verdict(cells: list, criteria: dict) -> str:
    return judge(cells, criteria)


CONTROLS = {"random": "norm adapter of random tokens under the same noise",
            "other": "another user's norm adapter under the same noise"}


def controls(cells: list, criteria: dict) -> dict:
    """The same rule with a control adapter in the own adapter's place (same noise draws, same base)."""
    return {name: judge(cells, criteria, key) if select(cells, adapter=key)
            else not_run(f"no adapter={key} cells in this result; run added 2026-11-30, --force runs it")
            for key, name in CONTROLS.items()}


def summary(cells: list) -> str:
    won, _ = counts(cells, CRITERIA)
    per = "; ".join(f"{u} margin(nats) " + " ".join(f"{s:g}:{margin(cells, u, s):.3f}" for s in SIGMAS)
                    + f", base ppl at 0.1 {fmt(ppl(cells, user=u, adapter='base', sigma_rel=0.1))}"
                    for u in values(cells, "user"))
    return f">= 50 % of the margin kept at sigma_rel 0.1 for {won}/{len(values(cells, 'user'))} users; {per}"


BET = Bet(id="63", slug="noise_robustness", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
