"""The bets' pure verdict functions on constructed cells, and the probes (noise hooks, ensembles, averaging)."""
from __future__ import annotations

import math

import pytest
import torch

from sharedllm.bets.catalogue import current
from sharedllm.bets.cells import confusion_outcomes, ppl, scored
from sharedllm.bets.harness import get_bet, grade
from sharedllm.bets.probes import block_noise, ensemble_nll, mean_state
from sharedllm.metrics import score_windows

from .bet_cells import confusion


def test_grade_order():
    assert grade(True, True, True) == "CATASTROPHIC"
    assert grade(True, True, False) == "STRICT_PASS"
    assert grade(False, True, False) == "LENIENT_PASS"
    assert grade(False, False, False) == "FAIL"


def test_pooled_ppl_weights_by_tokens():
    cells = [scored(100.0, 100, u="a"), scored(300.0, 100, u="a")]
    assert ppl(cells, u="a") == pytest.approx(math.exp(2.0))


def test_confusion_outcomes_margin_and_ties():
    cells = confusion([9.6, 10.0, 9.4])
    assert confusion_outcomes(cells, 0.05) == {"p": (False, True), "n": (False, False), "s": (True, True)}


def test_every_registered_bet_declares_its_criteria():
    for bet_id in current().bets:
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
