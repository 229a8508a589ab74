"""sharedllm.recipes: the recommended lrs are the committed lr_sensitivity result's dev-chosen ones; adapt trains at
them by default, the catalogue's lr is one flag away, and the bets keep their own lrs."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from sharedllm.bets.catalogue import current
from sharedllm.errors import SharedLLMError
from sharedllm.recipes import CATALOGUE_LR, DEFAULT_BASE, RECOMMENDED_LR, SOURCE, recipe_lr
from sharedllm.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def committed(base: str) -> dict:
    path = REPO / SOURCE[base]["file"]
    assert path.is_file(), f"{path} is missing: the recipe for {base} names it as its source"
    return json.loads(path.read_text())


def dev_chosen(cells: list, method: str) -> float:
    """Written from the bet's criteria ("lr_choice"), not from its module: the grid lr with the lowest mean over users
    of log(dev ppl / base dev ppl), ties to the smaller lr; ppl pooled from raw nll / tokens."""
    def ppl(**w):
        rows = [c for c in cells if c.get("kind") == "grid" and c.get("eval") == "dev"
                and all(c.get(k) == v for k, v in w.items())]
        assert rows, w
        return math.exp(sum(c["nll"] for c in rows) / sum(c["tokens"] for c in rows))

    users = sorted({c["user"] for c in cells if c.get("eval") == "dev" and c.get("method") == method})
    lrs = sorted({c["lr"] for c in cells if c.get("eval") == "dev" and c.get("method") == method})
    score = {lr: sum(math.log(ppl(user=u, method=method, lr=lr) / ppl(user=u, method="none")) for u in users)
             / len(users) for lr in lrs}
    return min(lrs, key=lambda lr: (round(score[lr], 12), lr))


@pytest.mark.parametrize("base", sorted(RECOMMENDED_LR))
def test_the_recommended_table_is_the_committed_lr_result(base):
    result, src = committed(base), SOURCE[base]
    assert result["bet"] == src["bet"] == "lr_sensitivity" and result["version"] == src["version"]
    assert result["config"]["base"] == base and result["config"]["base_fingerprint"] == src["base_fingerprint"]
    assert result["meta"]["git_commit"].startswith(src["git_commit"])
    assert {k: result["config"][k] for k in ("steps", "batch", "seq")} == {k: src[k] for k in ("steps", "batch", "seq")}
    assert result["verdict"] and "cells" in result, "an unfinished result"
    module = current().module("lr_sensitivity")
    assert set(RECOMMENDED_LR[base]) == set(result["criteria"]["grid"]) == set(module.GRID)
    for method, lr in RECOMMENDED_LR[base].items():
        assert lr == dev_chosen(result["cells"], method) == module.tuned_lr(result["cells"], method), method
    assert result["criteria"]["catalogue_lr"] == CATALOGUE_LR


def test_the_catalogue_lr_is_trainconfigs_default_which_the_bets_use():
    """The bets build their TrainConfigs from TrainConfig's default (or an explicit lr per unit) and never read the
    recipes, so changing adapt's default lr changes no bet."""
    assert TrainConfig().lr == CATALOGUE_LR == 5e-5
    for folder in (REPO / "src" / "sharedllm" / "bets", REPO / "experiments" / "bets"):
        for f in folder.rglob("*.py"):
            text = f.read_text()
            assert "recipes" not in text and "commands.args" not in text and "train_recipe" not in text, f


def test_recipe_lr_per_method_base_and_recipe():
    assert recipe_lr("norm", DEFAULT_BASE).lr == 2e-3 and recipe_lr("lora", DEFAULT_BASE).lr == 1e-3
    assert recipe_lr("full", DEFAULT_BASE).lr == 5e-5 and "transferred" not in recipe_lr("norm", DEFAULT_BASE).note
    other = recipe_lr("norm", "qwen2.5-coder-0.5b")
    assert other.name == "recommended" and other.lr == 2e-3 and "transferred" in other.note
    assert recipe_lr("norm", DEFAULT_BASE, "catalogue").lr == CATALOGUE_LR
    steer = recipe_lr("steer", DEFAULT_BASE)
    assert steer.name == "catalogue" and steer.lr == CATALOGUE_LR
    with pytest.raises(ValueError):
        recipe_lr("norm", DEFAULT_BASE, "magic")


def _args(*argv):
    from sharedllm.commands.args import add_method_args, add_train_args

    p = argparse.ArgumentParser()
    p.add_argument("--base", default="default")
    add_method_args(p)
    add_train_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, lr, recipe", [
    ([], 2e-3, "recommended"),
    (["--method", "lora"], 1e-3, "recommended"),
    (["--method", "full"], 5e-5, "recommended"),
    (["--recipe", "catalogue"], 5e-5, "catalogue"),
    (["--lr", "5e-5"], 5e-5, "given"),
    (["--base", "tiny", "--method", "lora"], 1e-3, "recommended"),
])
def test_adapt_trains_at_the_recommended_lr_unless_told(argv, lr, recipe):
    from sharedllm.commands.args import train_config, train_recipe

    args = _args(*argv)
    assert train_config(args).lr == lr and train_recipe(args).name == recipe


def test_lr_and_recipe_together_are_refused():
    from sharedllm.commands.args import train_recipe

    with pytest.raises(SharedLLMError, match="not both"):
        train_recipe(_args("--lr", "1e-3", "--recipe", "catalogue"))


def test_adapt_reports_its_lr_and_where_it_came_from(capsys, user_text, tmp_path):
    from sharedllm.cli import main

    out = tmp_path / "u.safetensors"
    assert main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--steps", "2", "--seq",
                 "32", "--window", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["lr"] == 2e-3 and r["recipe"] == "recommended" and "lr_sensitivity" in r["lr_source"]
    from sharedllm import wire

    assert wire.read_file(out)[1]["train"]["lr"] == 2e-3
    assert main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--steps", "2", "--seq",
                 "32", "--window", "32", "--recipe", "catalogue"]) == 0
    assert "lr 5e-05 (catalogue" in capsys.readouterr().out


def test_methods_the_bet_has_not_run_get_their_screened_lr_marked_as_a_screening_choice():
    from sharedllm.recipes import SCREENED_LR

    assert not set(SCREENED_LR[DEFAULT_BASE]) & set(RECOMMENDED_LR[DEFAULT_BASE])  # the bet's lrs come first
    for method, lr in SCREENED_LR[DEFAULT_BASE].items():
        r = recipe_lr(method, DEFAULT_BASE)
        assert r.name == "recommended" and r.lr == lr and "screening choice" in r.note and "transferred" not in r.note
        assert "transferred" in recipe_lr(method, "qwen2.5-coder-0.5b").note
        assert recipe_lr(method, DEFAULT_BASE, "catalogue").lr == CATALOGUE_LR
