"""The committed results: every expected file is there, its verdict is what an independent re-implementation of the
bet's rule (below, written from the criteria, not from the modules) and the module both give, its criteria and
version are the module's, side verdicts recompute, and REPORT.md and the README quote what the cells say."""
from __future__ import annotations

import json
import math

import pytest

from sharedllm.bets import report
from sharedllm.bets.catalogue import current
from sharedllm.bets.harness import Options, get_bet

BETS, RESULTS, README = current().bets, current().results, current().default("README")
COMMITTED = ["13", "37", "46", "49", "52", "53", "54", "55", "58", "60", "61", "63", "scale_protocol",
             "lr_sensitivity", "chat_cohort"]
OTHER_DTYPE = {"chat_cohort": "bf16"}  # run only under bf16 autocast (results/other/smollm2-135m-instruct-bf16/)


def load(bet_id: str) -> dict:
    sub = f"other/smollm2-135m-instruct-{OTHER_DTYPE[bet_id]}/" if bet_id in OTHER_DTYPE else ""
    path = RESULTS / f"{sub}{BETS[bet_id]}.json"
    assert path.is_file(), f"committed result {sub}{path.name} is missing"
    assert report.result_file(RESULTS, BETS[bet_id]) == path, "REPORT would read another file"
    if bet_id in OTHER_DTYPE:  # where `sharedllm bet <id> --dtype bf16` writes, without --results
        assert Options(dtype=OTHER_DTYPE[bet_id]).result_dir() == path.parent
    return json.loads(path.read_text())


# ---- an independent re-implementation of each rule: pooled ppl from raw nll / tokens, thresholds from criteria ----

def pp(cells: list, **w) -> float:
    rows = [x for x in cells if all(x.get(k) == v for k, v in w.items())]
    assert rows, w
    return math.exp(sum(x["nll"] for x in rows) / sum(x["tokens"] for x in rows))


def users(cells: list) -> list:
    return sorted({x["user"] for x in cells if x.get("user") not in (None, "-")})


def tier(strict: bool, lenient: bool, catastrophic: bool) -> str:
    return "CATASTROPHIC" if catastrophic else "STRICT_PASS" if strict else "LENIENT_PASS" if lenient else "FAIL"


def by_users(won: int, lost: int, k: dict) -> str:
    return tier(won >= 3, won >= 2, lost >= k["CATASTROPHIC"]["min_users_lost"])


def own_vs(cells, k, mine, rival, tie_loses=False):
    won = sum(pp(cells, user=u, condition=mine) <= 0.95 * pp(cells, user=u, condition=rival) for u in users(cells))
    lost = sum((pp(cells, user=u, condition=rival) <= pp(cells, user=u, condition=mine)) if tie_loses else
               (pp(cells, user=u, condition=rival) < pp(cells, user=u, condition=mine)) for u in users(cells))
    return by_users(won, lost, k)


def v13(cells, k):
    general = [x for x in cells if "domain" not in x]  # the code / prose cells are reported, not judged
    judged = [x for x in general if x["text"] != k["dev_text"]]
    r = pp(judged, condition="ternary") / pp(judged, condition="fp")
    size = [x["bytes"] for x in general if x["condition"] == "ternary"][0] / [x["bytes"] for x in general
                                                                             if x["condition"] == "fp"][0]
    return tier(size <= 1 / 8 and r <= 1.5, r <= 3.0, r > 10.0)


def v37(cells, k):
    r = pp(cells, method="norm") / pp(cells, method="full")
    size = {x["method"]: x["bytes"] for x in cells}
    return tier(r < 2.0 and size["norm"] / size["full"] < 0.01, r < 5.0, r > 10.0)


def v46(cells, k):
    ok = [pp(cells, method="norm", seed=s, text=t) / pp(cells, method="full", seed=s, text=t) < 2.0
          for s in range(5) for t in range(3)]
    return tier(sum(ok) == 15, sum(ok) >= 12, sum(ok) < 8)


def v49(cells, k):
    won = 0
    for u in users(cells):
        mine = pp(cells, user=u, method="norm", eval="personal")
        won += all(mine < pp(cells, user=u, method=r, eval="personal")
                   and pp(cells, user=u, method="norm", eval="general") <= 1.05 * pp(cells, user=u, method=r,
                                                                                    eval="general")
                   for r in ("lora", "full"))  # norm's bytes are the smallest: checked in the key numbers
    return tier(won == 3, won >= 2, won == 0)


def v52(cells, k):
    imp = [1 - pp(cells, user=u, condition="ternary_norm") / pp(cells, user=u, condition="ternary_base")
           for u in users(cells)]
    return tier(sum(i >= 0.30 for i in imp) >= 3, sum(i >= 0.15 for i in imp) >= 2, all(i <= 0 for i in imp))


def v53(cells, k, scheme="int8"):
    q = {u: pp(cells, user=u, scheme=scheme) for u in users(cells)}
    raw = {u: pp(cells, user=u, scheme="float16") for u in users(cells)}
    worse = sum(q[u] > pp(cells, user=u, scheme="none") for u in users(cells))
    return tier(sum(q[u] / raw[u] <= 1.5 for u in q) >= 3, sum(q[u] / raw[u] <= 2.0 for u in q) >= 2, worse >= 2)


def v58(cells, k):
    won = sum(pp(cells, user=u, method="steer") < pp(cells, user=u, method="norm") for u in users(cells))
    return tier(won >= 3, won >= 2, won == 0)


def confusion_won(cells) -> tuple[list, list]:
    won, best = [], []
    for u in users(cells):
        own = pp(cells, user=u, adapter=u)
        rivals = [pp(cells, user=u, adapter=a) for a in {x["adapter"] for x in cells if x["user"] == u} if a != u]
        won.append(all(own <= 0.95 * r for r in rivals))
        best.append(all(own < r for r in rivals))
    return won, best


def v61(cells, k):
    won, best = confusion_won(cells)
    return tier(all(won) and len(won) >= 3, sum(won) / 3 >= 2 / 3, sum(best) / 3 <= 1 / 3)


def v63(cells, k, adapter="own"):
    def m(u, s):
        return math.log(pp(cells, user=u, adapter="base", sigma_rel=s) / pp(cells, user=u, adapter=adapter, sigma_rel=s))
    won = sum(m(u, 0.1) > 0 and m(u, 0.1) >= 0.5 * m(u, 0.0) for u in users(cells))
    gone = sum(m(u, 1e-3) <= 0 for u in users(cells))
    return tier(won >= 3, won >= 2, gone >= 2)


def vscale(cells, k):
    conf = [x for x in cells if x.get("kind") == "confusion"]
    won, _ = confusion_won(conf)
    f, seeds = sum(won) / len(won), {x["seed"] for x in conf} - {-1}
    return tier(f >= 0.9 and len(won) >= 10 and len(seeds) >= 3, f > 0.5, f <= 0.25)


def vlr(cells, k):
    """lr chosen on dev text (mean log ratio to the base's dev ppl), then 61's rule at it plus general-text bounds."""
    grid = [x for x in cells if x.get("kind") == "grid"]

    def dev(lr):
        us = users([x for x in grid if x["method"] == "norm"])
        return sum(math.log(pp(grid, user=u, method="norm", lr=lr, eval="dev")
                            / pp(grid, user=u, method="none", eval="dev")) for u in us) / len(us)
    lr = min(sorted({x["lr"] for x in grid if x["method"] == "norm"}), key=lambda x: (round(dev(x), 12), x))
    won, best = confusion_won([x for x in cells if x.get("kind") == "confusion" and x["lr"] == lr])
    general = max(pp(grid, user=u, method="norm", lr=lr, eval="general") / pp(grid, method="none", eval="general")
                  for u in users([x for x in grid if x["method"] == "norm"]))
    s, le, c = k["STRICT"], k["LENIENT"], k["CATASTROPHIC"]
    return tier(sum(won) >= s["min_users_won"] and general <= s["max_general_ratio"] and len(won) >= 3,
                sum(won) >= le["min_users_won"] and sum(best) >= le["own_best_users"]
                and general <= le["max_general_ratio"],
                lr == k["catalogue_lr"] or sum(best) <= c["max_users_own_best"] or general > c["above_general_ratio"])


def chat_won(cells, lr) -> list:
    """61's rule among chat senders, every adapter at norm lr `lr`, beside the base row (lr 0)."""
    won, _ = confusion_won([x for x in cells if x["kind"] == "confusion" and x["lr"] in (lr, 0.0)])
    return won


def chat_tuned_lr(cells) -> float:
    lrs = {x["lr"] for x in cells if x["kind"] == "confusion"} - {0.0, 5e-5}
    assert len(lrs) == 1, lrs
    return lrs.pop()


def vchat(cells, k):
    won = chat_won(cells, chat_tuned_lr(cells))
    f = sum(won) / len(won)
    return tier(f >= 0.9, f > 0.5, f <= 0.25)


INDEPENDENT = {
    "13": v13, "37": v37, "46": v46, "49": v49, "52": v52, "53": v53,
    "54": lambda c, k: own_vs(c, k, "own", "average"), "55": lambda c, k: own_vs(c, k, "own", "ensemble"),
    "58": v58, "60": lambda c, k: own_vs(c, k, "real", "random", tie_loses=True), "61": v61, "63": v63,
    "scale_protocol": vscale, "lr_sensitivity": vlr, "chat_cohort": vchat,
}


@pytest.mark.parametrize("bet_id", COMMITTED)
def test_committed_result_is_there_and_judged_by_the_module(bet_id):
    r, bet = load(bet_id), get_bet(bet_id)
    assert r["bet"] == bet.id and r["version"] == bet.version, "result judged by another version of the bet"
    assert r["criteria"] == json.loads(json.dumps(bet.criteria)), "criteria changed after the run"
    assert r["config"]["quick"] is False and r["meta"]["git_commit"]
    assert r["verdict"] == bet.verdict(r["cells"], r["criteria"])
    assert r["verdict"] == INDEPENDENT[bet_id](r["cells"], r["criteria"]), "the independent re-implementation disagrees"


def test_committed_side_verdicts_recompute():
    r = load("53")
    assert r["side_verdicts"] == get_bet("53").side_verdicts(r["cells"], r["criteria"])
    assert r["side_verdicts"] == {s: v53(r["cells"], r["criteria"], s) for s in ("int8-channel", "int8-delta")}
    for bet_id in COMMITTED:  # every stored side verdict is what the module gives now
        stored = load(bet_id).get("side_verdicts")
        assert stored is None or stored == report.side_verdicts(load(bet_id)), bet_id
    assert list(report.side_verdicts(load("scale_protocol")).values()) == [
        vscale(load("scale_protocol")["cells"], {}).replace("CATASTROPHIC", "FAIL")]


# finished scale_protocol runs on the larger bases (issue 12)
LARGER_BASES = ["qwen2.5-coder-0.5b-bf16", "qwen2.5-coder-1.5b-bf16"]


@pytest.mark.parametrize("folder", LARGER_BASES)
def test_a_larger_base_protocol_is_judged_from_its_cells(folder):
    """A larger base's finished protocol: its verdict, its side verdicts (the catalogue's wording, the tuned arm) and
    its random-token control are what the module and the independent rule give from its cells."""
    path = RESULTS / "other" / folder / "scale_protocol.json"
    assert path.is_file(), f"committed result other/{folder}/scale_protocol.json is missing"
    r, bet = json.loads(path.read_text()), get_bet("scale_protocol")
    assert r["config"]["quick"] is False and r["config"]["base"] == folder.removesuffix("-bf16")
    assert r["criteria"] == json.loads(json.dumps(bet.criteria)) and r["version"] == bet.version
    cells = r["cells"]
    assert r["verdict"] == bet.verdict(cells, r["criteria"]) == vscale(cells, r["criteria"])
    tuned = [dict(x, kind="confusion") for x in cells if x["kind"] == "tuned_confusion"]
    base_rows = [x for x in cells if x["kind"] == "confusion" and x["adapter"] == "base"]
    assert tuned, "the tuned arm is missing"
    assert r["side_verdicts"] == report.side_verdicts(r) == {
        "by the catalogue's wording (no CATASTROPHIC tier)": vscale(cells, {}).replace("CATASTROPHIC", "FAIL"),
        f"at the tuned norm lr {tuned[0]['lr']:g} (lr_sensitivity's)": vscale(base_rows + tuned, {})}
    randoms = {x["user"] for x in cells if x["kind"] == "random"}
    assert randoms == set(r["config"].get("random_control_users", r["config"]["users"]))  # --random-users N, or all
    as_own = [x for x in cells if x["kind"] == "confusion" and x["adapter"] != x["user"] and x["user"] in randoms]
    as_own += [dict(x, kind="confusion", adapter=x["user"]) for x in cells if x["kind"] == "random"]
    assert list(report.control_verdicts(r, {}).values()) == [vscale(as_own, {})]


def test_committed_controls_by_hand():
    """The bare base meets 37's and 46's STRICT rule (base/full < 2 at 0 bytes) and 53's (base within 1.5x raw)."""
    results = report.load_results(RESULTS)
    c37, c46 = results["37"]["cells"], results["46"]["cells"]
    assert pp(c37, method="none") / pp(c37, method="full") < 2.0
    assert all(pp(c37, method="none", text=t) / pp(c46, method="full", seed=s, text=t) < 2.0
               for s in range(5) for t in range(3))
    assert report.control_verdicts(results["37"], results) == {"bare base": "STRICT_PASS"}
    assert list(report.control_verdicts(results["46"], results).values()) == ["STRICT_PASS"]
    assert set(report.control_verdicts(results["53"], results).values()) == {"STRICT_PASS"}
    # 63: a random-token adapter and another user's adapter, each in the own adapter's place under the same noise
    c63 = results["63"]["cells"]
    assert [v63(c63, {}, a) for a in ("random", "other")] == ["STRICT_PASS", "STRICT_PASS"]
    assert sorted(report.control_verdicts(results["63"], results).values()) == ["STRICT_PASS", "STRICT_PASS"]
    assert set(results) - set(COMMITTED) == set(), "a new committed result: add it to COMMITTED"


# ---- REPORT.md and README quote the cells ----

def report_row(bet_id: str) -> list:
    rows = [x for x in current().report.read_text().splitlines() if x.startswith(f"| {BETS[bet_id]} |")]
    assert len(rows) == 1, f"REPORT.md has {len(rows)} rows for {BETS[bet_id]}"
    return [x.strip() for x in rows[0].split("|")[1:-1]]


def g3(x: float) -> str:
    return f"{x:.3g}"


def key_numbers(bet_id: str, cells: list) -> list:
    """Numbers the bet's REPORT.md row must show, computed here from raw cells."""
    if bet_id == "13":
        gen = [x for x in cells if "domain" not in x]
        domains = sorted({x["domain"] for x in cells if "domain" in x})
        return ([f"{pp(gen, condition='ternary', text=t) / pp(gen, condition='fp', text=t):.2f}" for t in range(3)]
                + [f"{d} (" for d in domains]
                + [f"{pp(cells, condition='ternary', domain=d) / pp(cells, condition='fp', domain=d):.2f}x" for d in domains])
    if bet_id in ("37", "46"):
        return [g3(pp(cells, method=m)) for m in ("norm", "full")] if bet_id == "37" else [
            f"{sum(pp(cells, method='norm', seed=s, text=t) < 2 * pp(cells, method='full', seed=s, text=t) for s in range(5) for t in range(3))}/15"]
    if bet_id == "53":
        return [g3(pp(cells, user=u, scheme=s)) for u in users(cells) for s in ("none", "float16", "int8")]
    if bet_id in ("54", "55", "60", "52"):
        conds = {"54": ("own", "average"), "55": ("own", "ensemble"), "60": ("real", "random"),
                 "52": ("ternary_base", "ternary_norm")}[bet_id]
        return [g3(pp(cells, user=u, condition=x)) for u in users(cells) for x in conds
                if pp(cells, user=u, condition=x) < 1000]
    if bet_id in ("49", "58"):
        return [g3(pp(cells, user=u, method="norm", **({"eval": "personal"} if bet_id == "49" else {})))
                for u in users(cells)]
    if bet_id == "61":
        return [g3(pp(cells, user=u, adapter=a)) for u in users(cells) for a in ("base", u)]
    if bet_id == "63":
        return [f"0.1:{math.log(pp(cells, user=u, adapter='base', sigma_rel=0.1) / pp(cells, user=u, adapter='own', sigma_rel=0.1)):.3f}"
                for u in users(cells)]
    if bet_id == "lr_sensitivity":  # each user's ppl at the tuned norm lr 2e-3 and general ratio, to 3 digits
        grid = [x for x in cells if x.get("kind") == "grid"]
        return [f"{g3(pp(grid, user=u, method='norm', lr=2e-3, eval='personal'))}/" for u in users(grid)] + [
            f"general x{pp(grid, user=u, method='norm', lr=2e-3, eval='general') / pp(grid, method='none', eval='general'):.3f}"
            for u in users(grid)]
    if bet_id == "chat_cohort":  # users won at each norm lr, and the config's dtype
        return [f"norm lr {lr:g}: own wins by >= 5 % for {sum(chat_won(cells, lr))}/{len(chat_won(cells, lr))}"
                for lr in (5e-5, chat_tuned_lr(cells))]
    conf = [x for x in cells if x.get("kind") == "confusion"]
    won, best = confusion_won(conf)
    return [f"{sum(best)}/{len(best)}", f"{len(won)} users", "1 of 3 seeds", "reduced protocol"]


@pytest.mark.parametrize("bet_id", COMMITTED)
def test_report_row_quotes_the_cells(bet_id):
    r = load(bet_id)
    row = report_row(bet_id)
    assert row[2].startswith(f"**{r['verdict']}**"), row[2]
    assert ("bf16 autocast" in row[2]) == (OTHER_DTYPE.get(bet_id) == "bf16"), row[2]
    for n in key_numbers(bet_id, r["cells"]):
        assert n in row[4], f"{BETS[bet_id]}: {n} not in the key numbers {row[4]!r}"


def test_report_marks_passes_a_control_meets_too():
    for bet_id in COMMITTED:
        row = report_row(bet_id)
        controls = report.control_verdicts(load(bet_id), report.load_results(RESULTS))
        weak = not report.discriminating(load(bet_id)["verdict"], controls)
        assert ("(not discriminating)" in row[2]) == weak, bet_id
        assert row[3].startswith("yes: ") == (controls is not None and any(
            v in ("STRICT_PASS", "LENIENT_PASS") for v in controls.values())), bet_id
    assert report_row("37")[3] == "yes: bare base STRICT_PASS"
    assert report_row("52")[3] == "no: norm adapter of random tokens on the ternary base FAIL"  # run 2026-11-30
    assert report_row("63")[3].startswith("yes: ")
    assert "by the catalogue's wording (no CATASTROPHIC tier): FAIL" in report_row("scale_protocol")[2]


def test_readme_bets_block_is_what_the_results_say():
    text = README.read_text()
    assert report.BEGIN in text and report.END in text
    block = report.BEGIN + text.split(report.BEGIN, 1)[1].split(report.END, 1)[0] + report.END
    assert block == report.readme_block(report.load_results(RESULTS)), "README's bets block drifted: run `sharedllm bets report`"
    for bet_id in ("37", "46", "53", "63"):
        line = next(x for x in block.splitlines() if x.startswith(f"- {BETS[bet_id]}"))
        assert "**not discriminating**" in line
    assert '"1B+" protocol' not in text
