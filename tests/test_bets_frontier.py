"""Bet adapter_frontier (and its screen): the quick run end to end on the tiny base, the in-context scoring with a
cached prefix, and the verdict rule on constructed numbers at its boundaries."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from sharedllm.bets.cells import scored
from sharedllm.bets.harness import VERDICTS, Options, get_bet, run_bet

from .conftest import CORPORA

af = importlib.import_module("experiments.bets.adapter_frontier")
LIMIT = af.SIZE_LIMIT


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, res = tmp_path_factory.mktemp("frontier_out"), tmp_path_factory.mktemp("frontier_res")
    return {b: run_bet(get_bet(b), Options(quick=True, corpora=CORPORA, out=out, results=res))
            for b in ("adapter_frontier_screen", "adapter_frontier", "adapter_frontier_wide")}
PLANS = {"adapter_frontier_screen": af.SCREEN, "adapter_frontier": af.FULL, "adapter_frontier_wide": af.WIDE}


def test_quick_runs_every_method_and_baseline(quick):
    for bet_id, r in quick.items():
        saved = json.loads(open(r["written"]).read())
        cells, bet = saved["cells"], get_bet(bet_id)
        assert saved["verdict"] in VERDICTS and saved["verdict"] == bet.verdict(cells, saved["criteria"])
        plan = PLANS[bet_id]
        assert af.measured(cells, "chat") == list(plan.methods) + (["incontext"] if plan.baselines else [])
        assert saved["config"]["methods"] == list(plan.methods)
        for key in plan.methods:  # each own adapter carries its footprint; an lr was chosen on the dev slice
            own = [c for c in cells if c["kind"] == "confusion" and c["method"] == key and c["adapter"] == c["user"]
                   and "bytes" in c and c["cohort"] == "chat" and c["text"] == 0]
            assert len(own) == 3 and all(c["int8_bytes"] < c["bytes"] and c["params"] > 0 and c["cpu_s"] is not None
                                         for c in own), key
            assert saved["config"]["chosen_lrs"][key] in af.METHODS[key][2]
            assert [c for c in cells if c["kind"] == "random" and c["method"] == key]
        if bet_id == "adapter_frontier_wide":
            assert not [c for c in cells if c["method"] in ("incontext", "hier") or c.get("cohort") == "clean"]
            continue
        shared = [c for c in cells if c["method"] == "hier" and c["adapter"] == "shared"]
        assert {c["user"] for c in shared} == {c["user"] for c in cells if c["kind"] == "confusion"} | {"general"}
        ic = [c for c in cells if c["method"] == "incontext" and "prefix_tokens" in c and c["cohort"] == "chat"
              and c["text"] == 0]
        assert len(ic) == 3 and all(c["prefix_tokens"] > 0 and c["bytes"] == 0 for c in ic)
        assert all(v in VERDICTS for v in saved["control_verdicts"].values()), saved["control_verdicts"]
        assert saved["side_verdicts"] == bet.side_verdicts(cells, saved["criteria"])
        assert ("screen" in saved["config"]) == (bet_id == "adapter_frontier_screen")
    assert sorted(af.FULL.methods + af.WIDE.methods) == sorted(af.METHODS)  # the split leaves no method out
    full = json.loads(open(quick["adapter_frontier"]["written"]).read())
    assert "the clean same-kind pairs, by the verdict rule" in full["side_verdicts"]
    at = [(c.get("cohort"), c["kind"]) for c in full["cells"] if c["method"] in af.METHODS]  # the order units ran in
    assert max(i for i, x in enumerate(at) if x == ("chat", "confusion")) < at.index(("clean", "confusion")) \
        < at.index(("chat", "random"))  # the verdict's chat matrices first, the clean pairs, then the controls
    assert "screened out:" in quick["adapter_frontier_screen"]["summary"]


def test_norm_ia3ff_is_registered_only_while_its_units_run(quick):
    from sharedllm.adapters import METHODS

    assert "norm_ia3ff" not in METHODS
    with af.registered("norm_ia3ff"):
        assert "norm_ia3ff" in METHODS
    assert "norm_ia3ff" not in METHODS


def test_incontext_cache_scores_what_the_concatenation_scores():
    from transformers import DynamicCache

    from sharedllm.base import load_base
    from sharedllm.compat import cache_kwargs

    model = load_base("tiny").model
    gen = torch.Generator().manual_seed(0)
    prefix, w = torch.randint(0, 250, (300,), generator=gen), torch.randint(0, 250, (33,), generator=gen)
    cache = DynamicCache()
    with torch.no_grad():
        for s in range(0, 300, 128):
            model(input_ids=prefix[None, s:s + 128], use_cache=True, **cache_kwargs(model, cache))
        full = model(input_ids=torch.cat([prefix, w[:-1]])[None], use_cache=False).logits[0, 300:]
        want = torch.nn.functional.cross_entropy(full.float(), w[1:], reduction="sum").item()
        for _ in range(2):  # the prefix is reused: the crop leaves it as it was
            logits = model(input_ids=w[None, :-1], use_cache=True, **cache_kwargs(model, cache)).logits
            got = torch.nn.functional.cross_entropy(logits[0].float(), w[1:], reduction="sum").item()
            cache.crop(-(len(w) - 1))
            assert cache.get_seq_length() == 300 and got == pytest.approx(want, rel=1e-5)


# ---- the rule on constructed numbers ----

def cohort(n_users: int, methods: dict, cohort_name: str = "chat") -> list:
    """Cells of a cohort: base ppl 10 per user and general 20; per method `spec`: wins (users whose own adapter is 6 %
    below the best rival; the others 4 % below), bytes, general ratio, and random=True for random-token cells."""
    users = [f"u{i}" for i in range(n_users)]
    T = 1000

    def cell(p, **kw):
        return scored(math.log(p) * T, T, cohort=cohort_name, text=0, **kw)

    cells = [cell(10.0, kind="confusion", method="none", adapter="base", user=u, lr=0.0) for u in users]
    cells.append(cell(20.0, kind="general", method="none", adapter="base", user="general", lr=0.0))
    for key, spec in methods.items():
        rival = 10.0 * (1 - spec.get("rival_gain", 0.1))
        for i, a in enumerate(users):
            for u in users:
                own = a == u
                p = rival * (1 - (0.06 if i < spec["wins"] else spec.get("lead", 0.04))) if own else rival
                extra = {"bytes": spec["bytes"], "int8_bytes": spec["bytes"] // 2, "params": spec["bytes"] // 2,
                         "cpu_s": 1.0} if own else {}
                cells.append(cell(p, kind="confusion", method=key, adapter=a, user=u, lr=1e-3, **extra))
            cells.append(cell(20.0 * spec.get("general", 1.0), kind="general", method=key, adapter=a, user="general",
                              lr=1e-3))
            if spec.get("random"):
                cells.append(cell(rival * 1.01, kind="random", method=key, adapter=a, user=a, lr=1e-3))
        if spec.get("shared") is not None:  # hier: the shared adapter alone as a rival
            cells += [cell(spec["shared"], kind="confusion", method=key, adapter="shared", user=u, lr=1e-3)
                      for u in users]
        cells += [cell(10.0, kind="dev", method=key, lr=lr, adapter="u0", user="u0") for lr in (1e-3, 2e-3)]
    cells.append(cell(10.0, kind="dev", method="none", lr=0.0, adapter="base", user="u0"))
    return cells


SCREEN, FULL = get_bet("adapter_frontier_screen"), get_bet("adapter_frontier")


def v(bet, cells):
    return bet.verdict(cells, bet.criteria)


@pytest.mark.parametrize("wins,size,general,want", [
    (4, LIMIT, 1.05, "STRICT_PASS"),  # 4/6 = 2/3 exactly, the size and general bounds exactly
    (4, LIMIT + 1, 1.05, "CATASTROPHIC"),  # one byte over: no method is eligible
    (4, LIMIT, 1.0501, "LENIENT_PASS"),  # over STRICT's general bound, within LENIENT's
    (4, LIMIT, 1.1001, "FAIL"),  # over both general bounds
    (3, LIMIT, 1.0, "FAIL"),  # 1/2 is not above 1/2
    (2, LIMIT, 1.0, "FAIL"),  # 1/3 > 1/4
    (1, LIMIT, 1.0, "CATASTROPHIC"),  # 1/6 <= 1/4
    (6, 10, 1.3, "FAIL"),  # general > 1.25 does not make it catastrophic: wins count
])
def test_screen_tiers_at_their_boundaries(wins, size, general, want):
    assert v(SCREEN, cohort(6, {"norm": {"wins": wins, "bytes": size, "general": general}})) == want


def test_the_full_bet_needs_every_declared_sender_for_strict():
    cells = cohort(6, {"norm": {"wins": 6, "bytes": 10}})
    assert v(SCREEN, cells) == "STRICT_PASS" and v(FULL, cells) == "LENIENT_PASS"  # 6 of the 12 declared
    assert v(FULL, cohort(12, {"norm": {"wins": 8, "bytes": 10}})) == "STRICT_PASS"  # 8/12 = 2/3
    assert v(FULL, cohort(12, {"norm": {"wins": 7, "bytes": 10}})) == "LENIENT_PASS"  # 7/12 > 1/2, < 2/3
    assert v(FULL, cohort(12, {"norm": {"wins": 3, "bytes": 10}})) == "CATASTROPHIC"  # 3/12 = 1/4


def test_only_eligible_adapter_methods_count():
    big = {"wins": 6, "bytes": LIMIT + 1}
    assert v(SCREEN, cohort(6, {"lora_r4": big, "norm": {"wins": 1, "bytes": 10}})) == "CATASTROPHIC"
    assert v(SCREEN, cohort(6, {"lora_r4": big, "norm": {"wins": 3, "bytes": 10}})) == "FAIL"
    # the in-context baseline stores nothing per user but is not an adapter: it never passes the bet
    assert v(SCREEN, cohort(6, {"incontext": {"wins": 6, "bytes": 0}, "norm": {"wins": 1, "bytes": 10}})) \
        == "CATASTROPHIC"
    # the best eligible method decides
    assert v(SCREEN, cohort(6, {"norm": {"wins": 1, "bytes": 10}, "vera": {"wins": 5, "bytes": LIMIT}})) \
        == "STRICT_PASS"


def test_the_wide_part_is_judged_with_no_size_bound():
    wide = get_bet("adapter_frontier_wide")
    big = {"wins": 8, "bytes": LIMIT * 4}
    assert v(wide, cohort(12, {"vera": big})) == "STRICT_PASS" and v(FULL, cohort(12, {"vera": big})) == "CATASTROPHIC"
    assert v(wide, cohort(12, {"vera": {**big, "wins": 7}, "road": {"wins": 1, "bytes": LIMIT * 2}})) == "LENIENT_PASS"
    assert v(wide, cohort(11, {"vera": {**big, "wins": 11}})) == "LENIENT_PASS"  # STRICT needs all 12 senders
    assert v(wide, cohort(12, {"road": {"wins": 3, "bytes": LIMIT * 2}})) == "CATASTROPHIC"


def test_hier_is_judged_against_the_shared_adapter_alone_too():
    ok = {"wins": 6, "bytes": 10}
    assert v(SCREEN, cohort(6, {"hier": {**ok, "shared": 20.0}})) == "STRICT_PASS"  # the shared alone is worse
    assert v(SCREEN, cohort(6, {"hier": {**ok, "shared": 5.0}})) == "CATASTROPHIC"  # better than every own


def test_random_token_control_takes_the_own_adapters_place():
    cells = cohort(6, {"norm": {"wins": 6, "bytes": 10, "random": True}})
    assert v(SCREEN, cells) == "STRICT_PASS"
    assert SCREEN.controls(cells, SCREEN.criteria) == {"norm adapter of random tokens as the sender's own":
                                                       "CATASTROPHIC"}  # 1 % above the rivals: wins for none


def test_screen_out_rule():
    cells = cohort(6, {"norm": {"wins": 0, "bytes": 10, "lead": 0.01},
                       "vera": {"wins": 3, "bytes": 20}, "loraxs": {"wins": 3, "bytes": 30},
                       "ia3_all": {"wins": 3, "bytes": 40, "lead": 0.03},
                       "road": {"wins": 6, "bytes": 50, "general": 1.3}})
    out = af.screen_out(cells, SCREEN.criteria)
    assert out["norm"].startswith("wins for no sender, median margin 1.0 % < 2 %")
    assert out["road"].startswith("general ppl x1.30")
    assert out["ia3_all"] == "dominated by loraxs (no more bytes, higher median margin, at least as many wins)"
    assert "vera" not in out and "loraxs" not in out  # the same median margin: neither dominates the other
    assert "screened out: " in SCREEN.summary(cells)


def test_lr_choice_ties_go_to_the_smaller_lr():
    cells = cohort(3, {"norm": {"wins": 3, "bytes": 10}})
    assert af.chosen_lr(cells, "norm") == 1e-3


def test_pareto_points_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    cells = cohort(6, {"norm": {"wins": 4, "bytes": 100}, "lora_r4": {"wins": 2, "bytes": 10_000}})
    result = {"cells": cells, "criteria": SCREEN.criteria, "config": {"base": "constructed"}}
    points = {p[0]: p for p in af.pareto_points(result)}
    assert points["norm"][1] == 100 and points["norm"][3] <= points["norm"][2] <= points["norm"][4]
    plot = af.pareto_plot(result, tmp_path / "p.png", "t")
    assert plot.is_file() and plot.stat().st_size > 1000


# ---- what is committed: a full result is judged by the module and by an independent rule; a partial one parses ----

def independent(cells: list, criteria: dict, n_declared: int) -> str:
    """The verdict rule written again from the criteria: pooled ppl from raw nll / tokens per (method, adapter, user)."""
    chat = [c for c in cells if c.get("cohort") == "chat"]

    def pp(**w):
        rows = [c for c in chat if all(c.get(k) == x for k, x in w.items())]
        return math.exp(sum(c["nll"] for c in rows) / sum(c["tokens"] for c in rows))

    users = sorted({c["user"] for c in chat if c["kind"] == "confusion" and c["method"] == "none"})
    judged = []
    for key in af.METHODS:
        own = {c["user"] for c in chat if c["kind"] == "confusion" and c["method"] == key and c["adapter"] == c["user"]}
        if not users or not own >= set(users):
            continue
        size = max(c["bytes"] for c in chat if c["method"] == key and c["adapter"] == c["user"] and "bytes" in c)
        if size > criteria["size_limit_bytes"]:
            continue
        won = 0
        for u in users:
            rivals = [pp(kind="confusion", method=key, adapter=a, user=u) for a in
                      {c["adapter"] for c in chat if c["kind"] == "confusion" and c["method"] == key and c["user"] == u}
                      if a != u] + [pp(kind="confusion", method="none", user=u)]
            won += pp(kind="confusion", method=key, adapter=u, user=u) <= (1 - criteria["margin"]) * min(rivals)
        f = won / len(users)
        g = max(pp(kind="general", method=key, adapter=u) for u in users) / pp(kind="general", method="none")
        judged.append((f >= 2 / 3 - 1e-9 and g <= 1.05 + 1e-9 and len(users) >= n_declared,
                       f > 0.5 + 1e-9 and g <= 1.10 + 1e-9, f <= 0.25 + 1e-9))
    if any(t[0] for t in judged):
        return "CATASTROPHIC" if all(t[2] for t in judged) else "STRICT_PASS"
    return "CATASTROPHIC" if all(t[2] for t in judged) else "LENIENT_PASS" if any(t[1] for t in judged) else "FAIL"


def test_independent_rule_agrees_on_constructed_numbers():
    for wins, size, general in [(4, LIMIT, 1.05), (4, LIMIT + 1, 1.0), (4, LIMIT, 1.07), (3, 10, 1.0), (1, 10, 1.0)]:
        cells = cohort(6, {"norm": {"wins": wins, "bytes": size, "general": general}})
        assert v(SCREEN, cells) == independent(cells, SCREEN.criteria, 6)


@pytest.mark.parametrize("bet_id", ["adapter_frontier_screen", "adapter_frontier", "adapter_frontier_wide"])
def test_committed_frontier_results_are_rejudged(bet_id):
    from sharedllm.bets import report
    from sharedllm.bets.catalogue import current

    bet, results = get_bet(bet_id), current().results
    folders = [results, *sorted(p for p in (results / "other").glob("*") if p.is_dir())]
    for folder in folders:
        full = folder / f"{bet_id}.json"
        if full.is_file():  # a finished (or incomplete) run: verdict, criteria and side verdicts are the module's
            r = json.loads(full.read_text())
            assert r["criteria"] == json.loads(json.dumps(bet.criteria)) and r["version"] == bet.version
            assert r["config"]["quick"] is False
            if not r.get("incomplete"):
                n = len(r["config"]["cohorts"]["chat"]) if "screen" in r["config"] else bet.criteria["STRICT"]["users"]
                assert r["verdict"] == bet.verdict(r["cells"], r["criteria"]) == independent(r["cells"], r["criteria"], n)
                assert r["side_verdicts"] == report.side_verdicts(r)
        partial = folder / "partial" / f"{bet_id}.json"
        if partial.is_file():  # units so far: well-formed cells the rule can read
            units = json.loads(partial.read_text())["units"]
            cells = [c for u in units.values() for c in u["cells"]]
            assert all(math.isfinite(c["nll"]) and c["tokens"] > 0 for c in cells if "nll" in c)
            for key in af.measured(cells, "chat"):
                assert 0.0 <= af.stats(cells, "chat", key, bet.criteria["margin"])["fraction"] <= 1.0


def test_report_section_from_a_checkpoint(tmp_path):
    """A screen part-way: a provisional table of the methods measured so far and a provisional Pareto plot."""
    pytest.importorskip("matplotlib")
    cells = cohort(6, {"norm": {"wins": 4, "bytes": 100}, "lora_r4": {"wins": 1, "bytes": LIMIT * 8}})
    cells += cohort(6, {"road": {"wins": 5, "bytes": 200}})[-1:]  # road: a dev cell only, no matrix yet
    part = tmp_path / "partial" / "adapter_frontier_screen.json"
    part.parent.mkdir()
    part.write_text(json.dumps({"stamp": {}, "units": {"a": {"cells": cells}, "b": {"cells": []}}}))
    lines = af.make_section("adapter_frontier_screen", af.SCREEN)(tmp_path, tmp_path / "plots", tmp_path)
    head = next(x for x in lines if x.startswith("## "))
    assert "PROVISIONAL: 2 units checkpointed" in head and "smollm2-135m-instruct" in head
    rows = {x.split("|")[1].strip(): [c.strip() for c in x.split("|")[1:-1]] for x in lines if x.startswith("| ")}
    assert set(rows) == {"method", "norm", "lora_r4"}  # road has no matrix yet
    assert rows["norm"][2] == "100 / 50" and rows["norm"][4] == "4/6" and rows["lora_r4"][4] == "1/6"
    assert rows["lora_r4"][-1].startswith("screened out: ") and rows["norm"][-1] == "kept"
    plot = tmp_path / "plots" / "adapter_frontier_screen_smollm2-135m-instruct_provisional.png"
    assert plot.read_bytes()[:4] == b"\x89PNG" and any(plot.name in x for x in lines)
    assert af.make_section("adapter_frontier", af.FULL)(tmp_path, tmp_path / "plots", tmp_path) == []
    across = af.report_section(tmp_path, tmp_path / "plots", tmp_path)  # the screen's points on the across-sizes plot
    assert "## The frontier across sizes" in across
    assert (tmp_path / "plots" / "adapter_frontier_across_sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_the_full_bet_runs_screened_out_methods_last():
    """criteria "screen_out": a method the screen screens out runs last at 0.5B; hier stays after lora_r4."""
    assert af.method_order(None) == list(af.METHODS)
    screen = {"cells": cohort(6, {"norm": {"wins": 0, "lead": 0.01, "bytes": 100},
                                  "loraxs": {"wins": 4, "bytes": 200}}), "criteria": SCREEN.criteria}
    assert set(af.screen_out(screen["cells"], screen["criteria"])) == {"norm"}
    order = af.method_order(screen)
    assert order[-1] == "norm" and order[:-1] == [k for k in af.METHODS if k != "norm"]
    screen["cells"] = cohort(6, {"lora_r4": {"wins": 0, "lead": 0.01, "bytes": 100}})
    order = af.method_order(screen)
    assert order.index("lora_r4") == order.index("hier") - 1 and sorted(order) == sorted(af.METHODS)
    assert af.method_order({**screen, "incomplete": True}) == list(af.METHODS)


def test_the_recommended_format_is_the_smallest_user_specific_one():
    E = af.Evidence
    ev = [E("lora_r4", "STRICT_PASS", "12/12", 4_400_000, "chat_scale"), E("norm", "FAIL", "5/12", 88_500, "chat_scale"),
          E("loraxs", "LENIENT_PASS", "7/12", 87_900, "adapter_frontier"),
          E("vera", "LENIENT_PASS", "8/12", 697_000, "adapter_frontier_wide")]
    assert af.recommend(ev).method == "loraxs"  # passing, and fewer bytes than LoRA-r4 and VeRA
    line = af.format_line("b", ev)
    assert line.startswith("- b: **loraxs**, 87.9 KB per user, 18.9 GB for 215,000 users (user-specific by "
                           "LENIENT_PASS: 7/12") and "norm FAIL (5/12 win, 88.5 KB; chat_scale)" in line
    fails = [E("norm", "FAIL", "2/12", 88_500, "chat_scale"), E("lora_r4", "CATASTROPHIC", "1/12", 4_400_000, "x")]
    assert af.recommend(fails) is None and "**no measured per-user format is user-specific**" in af.format_line("b", fails)
    assert "not measured yet" in af.format_line("b", [])
    # a passing format whose bytes no result records still counts, after every one with known bytes
    assert af.recommend([E("norm", "LENIENT_PASS", "7/12", None, "chat_cohort"), *ev[:1]]).method == "lora_r4"


def test_readme_section_reads_finished_results_only(tmp_path):
    part = tmp_path / "other" / "qwen2.5-coder-0.5b-bf16" / "partial"
    part.mkdir(parents=True)
    part.joinpath("adapter_frontier.json").write_text(json.dumps({"stamp": {"dtype": "bf16"}, "units": {
        "a": {"cells": cohort(12, {"norm": {"wins": 12, "bytes": 100}})}}}))
    lines = af.readme_section(tmp_path)
    assert any(x.startswith("- qwen2.5-coder-0.5b: not measured yet") for x in lines)  # a checkpoint is no result
    done = {"bet": "adapter_frontier", "cells": cohort(12, {"norm": {"wins": 12, "bytes": 100}}), "criteria": FULL.criteria,
            "config": {"base": "qwen2.5-coder-0.5b", "dtype": "bf16"}, "verdict": "STRICT_PASS"}
    (part.parent / "adapter_frontier.json").write_text(json.dumps(done))
    line = next(x for x in af.readme_section(tmp_path) if x.startswith("- qwen2.5-coder-0.5b"))
    assert line.startswith("- qwen2.5-coder-0.5b: **norm**, 0.1 KB per user") and "12/12 senders win" in line
