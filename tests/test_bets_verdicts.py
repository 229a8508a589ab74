"""The bets' pure verdict functions on constructed cells, and the probes (noise hooks, ensembles, averaging)."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.bets import harness
from experiments.bets.cells import confusion_outcomes, ppl, scored
from experiments.bets.harness import get_bet, grade
from experiments.bets.probes import block_noise, ensemble_nll, mean_state
from sharedllm.metrics import score_windows


def c(ppl_value: float, **cond) -> dict:
    return scored(math.log(ppl_value) * 100, 100, **cond)


def test_grade_order():
    assert grade(True, True, True) == "CATASTROPHIC"
    assert grade(True, True, False) == "STRICT_PASS"
    assert grade(False, True, False) == "LENIENT_PASS"
    assert grade(False, False, False) == "FAIL"


def test_pooled_ppl_weights_by_tokens():
    cells = [scored(100.0, 100, u="a"), scored(300.0, 100, u="a")]
    assert ppl(cells, u="a") == pytest.approx(math.exp(2.0))


def shootout(norm_general: float, norm_bytes: int = 10) -> list:
    cells = []
    for user in ("p", "n", "s"):
        for m, pers, gen, size in (("norm", 10, norm_general, norm_bytes), ("lora", 11, 20, 100),
                                   ("full", 12, 20, 1000), ("none", 13, 20, 0)):
            cells += [c(pers, user=user, method=m, eval="personal", bytes=size),
                      c(gen, user=user, method=m, eval="general", bytes=size)]
    return cells


def test_shootout_dominance_uses_the_five_percent_general_tolerance():
    bet = get_bet("49")
    assert bet.verdict(shootout(20.9), bet.criteria) == "STRICT_PASS"   # 4.5 % worse on general text: allowed
    assert bet.verdict(shootout(21.1), bet.criteria) == "CATASTROPHIC"  # 5.5 % worse: not dominating
    assert bet.verdict(shootout(20.0, norm_bytes=5000), bet.criteria) == "CATASTROPHIC"  # bigger than LoRA


def confusion(own: float) -> list:
    users = ("p", "n", "s")
    return [c(own if a == u else 10.0, adapter=a, user=u) for a in ("base",) + users for u in users]


def test_confusion_margin_and_catastrophe():
    bet = get_bet("61")
    assert bet.verdict(confusion(9.4), bet.criteria) == "STRICT_PASS"   # 6 % better than every rival
    assert bet.verdict(confusion(9.6), bet.criteria) == "FAIL"          # best, but by only 4 %
    assert bet.verdict(confusion(10.5), bet.criteria) == "CATASTROPHIC"  # own is never best
    assert confusion_outcomes(confusion(9.6), 0.05) == {u: (False, True) for u in ("p", "n", "s")}


def test_replication_counts_pairs():
    bet = get_bet("46")
    cells = []
    for seed in range(5):
        for text in range(3):
            bad = seed == 0 and text < 2  # 13/15 pairs hold -> LENIENT
            cells += [c(30 if bad else 15, method="norm", seed=seed, text=text, bytes=1),
                      c(10, method="full", seed=seed, text=text, bytes=1000)]
    assert bet.verdict(cells, bet.criteria) == "LENIENT_PASS"


def test_noise_robustness_margin_rule():
    bet = get_bet("63")
    cells = []
    for user in ("p", "n", "s"):
        for s in bet.criteria["sigmas"]:
            own = 8.0 if s < 0.05 else (9.5 if s < 0.5 else 10.0)  # margin ln(10/8)=0.22 -> ln(10/9.5)=0.05
            cells += [c(10.0, user=user, adapter="base", sigma_rel=s), c(own, user=user, adapter="own", sigma_rel=s)]
    assert bet.verdict(cells, bet.criteria) == "FAIL"  # 23 % of the margin kept at 0.1 (< 50 %), not gone at 1e-3


def test_every_registered_bet_declares_its_criteria():
    for bet_id in harness.BETS:
        bet = get_bet(bet_id)
        assert bet.hypothesis and {"STRICT", "LENIENT", "CATASTROPHIC"} <= set(bet.criteria), bet_id


def test_block_noise_is_reproducible_and_off_at_zero(tiny):
    w = torch.randint(0, 256, (2, 17))
    clean = score_windows(tiny.model, w)
    with block_noise(tiny.model, 0.0, seed=1):
        assert score_windows(tiny.model, w) == clean
    with block_noise(tiny.model, 0.5, seed=1):
        a = score_windows(tiny.model, w)
    with block_noise(tiny.model, 0.5, seed=1):
        b = score_windows(tiny.model, w)
    assert a == b and a != clean
    assert score_windows(tiny.model, w) == clean  # hooks removed


def test_ensemble_of_identical_models_equals_the_model(tiny):
    w = torch.randint(0, 256, (3, 17))
    assert ensemble_nll([tiny.model, tiny.model], w) == pytest.approx(score_windows(tiny.model, w), rel=1e-5)


def test_mean_state():
    a, b = {"x": torch.ones(3)}, {"x": torch.zeros(3)}
    assert torch.equal(mean_state([a, b])["x"], torch.full((3,), 0.5))
    with pytest.raises(ValueError):
        mean_state([a, {"y": torch.ones(3)}])
