"""Bet chat_scale: the lr choice on the dev slices, the verdict rule at its boundaries on constructed cells, and the
report's chat-cohort table from a finished result or from a checkpoint part-way through."""
from __future__ import annotations

import importlib
import json
import math

import pytest

from sharedllm.bets.cells import scored
from sharedllm.bets.harness import get_bet

cs = importlib.import_module("experiments.bets.chat_scale")
name = importlib.import_module("experiments.bets.chat_cohort").name
BET = get_bet("chat_scale")
SENDERS = [name(u) for u in cs.USERS]
DEV = [name(u) for u in cs.DEV_USERS]
T = 1000


def cell(p: float, **kw) -> dict:
    return scored(math.log(p) * T, T, text=0, **kw)


def dev_cells(best: dict, methods=cs.METHODS) -> list:
    """The dev screen: base ppl 10 on every dev slice; each grid lr 9, the `best` lr of each method 8."""
    out = [cell(10.0, kind="dev", method="none", lr=0.0, adapter="base", user=u) for u in DEV]
    out.append(cell(20.0, kind="dev", method="none", lr=0.0, adapter="base", user="general"))
    for m in methods:
        for lr in cs.GRID[m]:
            for u in DEV:
                p = 8.0 if lr == best[m] else 9.0
                out += [cell(p, kind="dev", method=m, lr=lr, adapter=u, user=u, bytes=100, params=50, train_s=1.0),
                        cell(20.0, kind="dev", method=m, lr=lr, adapter=u, user="general")]
    return out


def matrix_cells(method: str, lr: float, wins: int, general: float = 1.0, rows: int | None = None) -> list:
    """The method's confusion rows (the first `rows` senders' adapters): own 6 % below every rival for the first
    `wins` senders, 4 % for the others; rivals 9; general ppl 20 x `general`."""
    out = []
    for i, a in enumerate(SENDERS[:rows]):
        for u in SENDERS:
            p = 9.0 * (1 - (0.06 if i < wins else 0.04)) if a == u else 9.0
            out.append(cell(p, kind="confusion", method=method, adapter=a, user=u, lr=lr))
        out.append(cell(20.0 * general, kind="general", method=method, adapter=a, user="general", lr=lr))
    return out


def base_cells() -> list:
    return [cell(10.0, kind="confusion", method="none", adapter="base", user=u, lr=0.0) for u in SENDERS] + \
        [cell(20.0, kind="general", method="none", adapter="base", user="general", lr=0.0)]


BEST = {"norm": 2e-3, "lora": 2e-4}


def full(norm_wins: int, lora_wins: int = 12, general: float = 1.0) -> list:
    return dev_cells(BEST) + base_cells() + matrix_cells("norm", BEST["norm"], norm_wins, general) + \
        matrix_cells("lora", BEST["lora"], lora_wins)


@pytest.mark.parametrize("wins,want", [(11, "STRICT_PASS"), (10, "LENIENT_PASS"), (7, "LENIENT_PASS"), (6, "FAIL"),
                                       (4, "FAIL"), (3, "CATASTROPHIC")])
def test_verdict_at_its_boundaries(wins, want):  # 11/12 >= 0.9 > 10/12; 7/12 > 1/2 = 6/12; 3/12 <= 1/4 < 4/12
    assert BET.verdict(full(wins), BET.criteria) == want


def test_the_lr_is_chosen_on_the_dev_slices_and_the_matrix_must_be_at_it():
    cells = full(12)
    assert cs.chosen_lr(cells, "norm") == 2e-3 and cs.chosen_lr(cells, "lora") == 2e-4
    moved = dev_cells({"norm": 5e-3, "lora": 2e-4}) + base_cells() + matrix_cells("norm", 2e-3, 12)
    with pytest.raises(AssertionError, match="dev slices choose 0.005"):
        cs.matrix(moved, "norm")
    tie = dev_cells({"norm": None, "lora": None})  # every lr scores the same: the smaller one
    assert cs.chosen_lr(tie, "norm") == min(cs.GRID["norm"])


def test_side_verdicts_judge_lora_and_the_general_text_bound():
    sides = BET.side_verdicts(full(12, lora_wins=2, general=1.06), BET.criteria)
    assert list(sides.values()) == ["CATASTROPHIC", "LENIENT_PASS"]  # LoRA 2/12; norm 12/12 but general 1.06 > 1.05


def write_checkpoint(folder, cells: list, units: int, base: str = "qwen2.5-coder-0.5b") -> None:
    part = folder / "other" / f"{base}-bf16" / "partial" / "chat_scale.json"
    part.parent.mkdir(parents=True)
    part.write_text(json.dumps({"stamp": {"dtype": "bf16"}, "units": {
        f"unit{i}": {"cells": cells if i == 0 else []} for i in range(units)}}))


def table(lines: list) -> dict:
    head = next(x for x in lines if x.startswith("| base |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    return {r[0]: dict(zip(cols, r)) for r in ([c.strip() for c in x.strip("|").split("|")]
                                               for x in lines if x.startswith("| ") and x != head)}


def test_report_table_from_a_checkpoint_part_way(tmp_path):
    cells = dev_cells(BEST, methods=("norm",)) + base_cells() + matrix_cells("norm", BEST["norm"], 8, rows=5)
    write_checkpoint(tmp_path, cells, 9)
    rows = table(cs.report_section(tmp_path, tmp_path / "plots", tmp_path))
    row = rows["qwen2.5-coder-0.5b"]
    assert row["status"] == "partial: 9 units (dev screen 1/2 methods)"
    assert row["norm lr"] == "0.002" and row["norm: own wins >= 5 %"] == ""  # 5 of 12 rows: no numbers yet
    assert row["LoRA-r4 lr"] == "dev: none yet"
    assert rows["qwen2.5-coder-1.5b"]["status"] == "not run yet"


def test_report_table_once_the_matrices_are_in(tmp_path):
    write_checkpoint(tmp_path, full(8, lora_wins=3), 40)
    row = table(cs.report_section(tmp_path, tmp_path / "plots", tmp_path))["qwen2.5-coder-0.5b"]
    assert row["norm: own wins >= 5 %"] == "8/12" and row["LoRA: own wins >= 5 %"] == "3/12"
    assert row["norm own vs best other"].startswith("+6.0 % (+4.0 to +6.0)")
    assert row["norm own vs base"].startswith("+15.4 %")  # 1 - 9 x 0.94 / 10, the median of 8 wins and 4 others
    assert row["general (worst own norm)"] == "x1.000" and row["LoRA beats norm"] == "0/12"


def test_the_senders_of_a_run_are_fixed_per_base():
    from types import SimpleNamespace as NS

    assert cs.senders(NS(quick=False, base_name="qwen2.5-coder-0.5b")) == cs.USERS
    assert cs.senders(NS(quick=False, base_name="qwen2.5-coder-1.5b")) == cs.SENDERS["qwen2.5-coder-1.5b"]
    assert cs.senders(NS(quick=True, base_name="qwen2.5-coder-1.5b")) == cs.USERS[:cs.QUICK_USERS]


def test_a_base_on_fewer_senders_gets_the_larger_run_on_the_same_senders_beside_it(tmp_path):
    six = [name(u) for u in cs.SENDERS["qwen2.5-coder-1.5b"]]
    assert len(six) == 6 and set(DEV) <= set(six)  # pre-registered: the 3 dev senders and 3 others
    write_checkpoint(tmp_path, full(8), 40)  # 0.5B: own wins for the first 8 senders of the 12
    write_checkpoint(tmp_path, [c for c in base_cells() if c["user"] in six + ["general"]], 7, "qwen2.5-coder-1.5b")
    rows = table(cs.report_section(tmp_path, tmp_path / "plots", tmp_path))
    assert rows["qwen2.5-coder-0.5b"]["norm: own wins >= 5 %"] == "8/12"
    sub = rows["qwen2.5-coder-0.5b (on qwen2.5-coder-1.5b's 6 senders)"]
    # of the six, sender_e33f6772 (the cohort's 10th) is not among the 8 winners; 5/6 < 0.9 and STRICT needs 12
    assert sub["norm: own wins >= 5 %"] == "5/6" and sub["status"] == "sub-matrix: LENIENT_PASS"
    assert rows["qwen2.5-coder-1.5b"]["status"].startswith("partial: 7 units")


# ---- what is committed: a result is judged by the module and by an independent rule; a checkpoint parses ----

def independent(cells: list, criteria: dict) -> str:
    """chat_scale's verdict written again from the criteria: the dev choice, then norm's matrix, from raw nll."""
    def pp(rows):
        return math.exp(sum(c["nll"] for c in rows) / sum(c["tokens"] for c in rows))

    def sel(**w):
        return [c for c in cells if all(c.get(k) == x for k, x in w.items())]

    dev_users = criteria["dev_users"]
    score = {lr: sum(math.log(pp(sel(kind="dev", method="norm", lr=lr, user=u)) /
                              pp(sel(kind="dev", method="none", user=u))) for u in dev_users)
             for lr in criteria["grid"]["norm"]}
    lr = min(score, key=lambda x: (round(score[x], 12), x))
    users = sorted({c["user"] for c in sel(kind="confusion", method="none")})
    won = 0
    for u in users:
        own = pp(sel(kind="confusion", method="norm", lr=lr, adapter=u, user=u))
        rivals = [pp(sel(kind="confusion", method="norm", lr=lr, adapter=a, user=u))
                  for a in {c["adapter"] for c in sel(kind="confusion", method="norm", user=u)} if a != u]
        won += own <= (1 - criteria["margin"]) * min(rivals + [pp(sel(kind="confusion", method="none", user=u))])
    f = won / len(users)
    if f <= 0.25 + 1e-9:
        return "CATASTROPHIC"
    if f >= 0.9 - 1e-9 and len(users) >= criteria["STRICT"]["users"]:
        return "STRICT_PASS"
    return "LENIENT_PASS" if f > 0.5 + 1e-9 else "FAIL"


@pytest.mark.parametrize("wins", [11, 8, 6, 2])
def test_independent_rule_agrees_on_constructed_cells(wins):
    cells = full(wins)
    assert BET.verdict(cells, BET.criteria) == independent(cells, json.loads(json.dumps(BET.criteria)))


def test_committed_chat_scale_results_are_rejudged():
    from sharedllm.bets import report
    from sharedllm.bets.catalogue import current

    for run in report.runs_of(current().results, "chat_scale"):
        if run.result is not None:  # a finished run: verdict and side verdicts are the module's and the rule's
            r = run.result
            assert r["criteria"] == json.loads(json.dumps(BET.criteria)) and r["config"]["quick"] is False
            assert r["verdict"] == BET.verdict(r["cells"], r["criteria"]) == independent(r["cells"], r["criteria"])
            assert r["side_verdicts"] == report.side_verdicts(r)
        else:  # units so far: well-formed cells, and the report's row builds from them
            assert all(math.isfinite(c["nll"]) and c["tokens"] > 0 for c in run.cells if "nll" in c)
            assert cs.scale_row(run)["status"].startswith(f"partial: {len(run.units)} units")
