"""Every bet's verdict (and side / control verdicts) on constructed cells: just above and just below each threshold,
ties, and fewer pairs / seeds / users / texts than the bet declares (never STRICT)."""
from __future__ import annotations

import pytest

from sharedllm.bets.harness import NOT_RUN, get_bet

from . import bet_cells as b
from .bet_cells import judge

UP, DOWN = 1.002, 0.998  # just above / just below a ratio threshold


@pytest.mark.parametrize("judged, size, want", [
    ((1.5 * DOWN, 1.5 * DOWN), 0.125 * DOWN, "STRICT_PASS"),
    ((1.5 * UP, 1.5 * UP), 0.125 * DOWN, "LENIENT_PASS"),
    ((1.2, 1.2), 0.125 * UP, "LENIENT_PASS"),       # small enough ppl, file too big
    ((3.0 * DOWN, 3.0 * DOWN), 0.5, "LENIENT_PASS"),
    ((3.0 * UP, 3.0 * UP), 0.5, "FAIL"),
    ((10 * DOWN, 10 * DOWN), 0.5, "FAIL"),
    ((10 * UP, 10 * UP), 0.5, "CATASTROPHIC"),
    ((8.5, 15.59), 0.306, "CATASTROPHIC"),          # the committed per-text ratios: 11.5x pooled off text 0
])
def test_13_thresholds_on_the_judged_texts(judged, size, want):
    assert judge("13", b.ternary({0: 1.0, 1: judged[0], 2: judged[1]}, size)) == want


def test_13_ignores_the_development_text():
    assert judge("13", b.ternary({0: 500.0, 1: 1.2, 2: 1.2}, 0.1)) == "STRICT_PASS"
    assert judge("13", b.ternary({0: 1.0, 1: 12.0, 2: 12.0}, 0.1)) == "CATASTROPHIC"
    assert judge("13", b.ternary({0: 1.0, 1: 1.2, 2: 1.2}, 0.1), dev_text=1) == "STRICT_PASS"


def test_13_code_and_prose_are_reported_not_judged():
    """The code and prose users' cells (a `domain`) are reported beside the verdict and never enter it."""
    from sharedllm.bets.harness import get_bet

    general = b.ternary({0: 1.0, 1: 1.2, 2: 1.2}, 0.1)
    code = [{**x, "domain": "code", "user": "programmer/x"} for x in b.ternary({0: 20.0, 1: 20.0, 2: 20.0}, 0.1, fp=5.0)
            if x["condition"] in ("fp", "ternary")]
    assert judge("13", general + code) == judge("13", general) == "STRICT_PASS"
    summary = get_bet("13").summary(general + code)
    assert "code (programmer/cpython_asyncio) ternary/fp 20.00x" in summary and "1.20x" in summary


def test_13_fewer_judged_texts_than_declared_is_not_strict():
    assert judge("13", b.ternary({0: 1.0, 1: 1.2}, 0.1)) == "LENIENT_PASS"


@pytest.mark.parametrize("ratio, size, want", [
    (2.0 * DOWN, 0.01 * DOWN, "STRICT_PASS"),
    (2.0 * UP, 0.01 * DOWN, "LENIENT_PASS"),
    (1.5, 0.01 * UP, "LENIENT_PASS"),
    (5.0 * DOWN, 0.001, "LENIENT_PASS"),
    (5.0 * UP, 0.001, "FAIL"),
    (10 * DOWN, 0.001, "FAIL"),
    (10 * UP, 0.001, "CATASTROPHIC"),
])
def test_37_thresholds(ratio, size, want):
    assert judge("37", b.norm_full(ratio, size)) == want


def test_37_ties_do_not_pass_strict():
    """The rule is strict: norm ppl < 2x full and size < 1 %; equal is not under."""
    cells = b.norm_full(1.5, 0.01)
    assert judge("37", cells) == "LENIENT_PASS"
    ratio_tie = b.norm_full(1.0, 0.001)  # norm ppl == full ppl, and max_ppl_ratio set to exactly that ratio
    assert judge("37", ratio_tie, STRICT={"max_ppl_ratio": 1.0, "max_size_ratio": 0.01}) == "LENIENT_PASS"


def test_37_fewer_eval_texts_than_declared_is_not_strict():
    assert judge("37", b.norm_full(1.3, 0.001, texts=2)) == "LENIENT_PASS"


def test_37_control_is_the_bare_base_by_the_same_rule():
    assert b.controls("37", b.norm_full(1.3, base_ratio=1.42)) == {"bare base": "STRICT_PASS"}
    assert b.controls("37", b.norm_full(1.3, base_ratio=2.0 * UP)) == {"bare base": "LENIENT_PASS"}
    assert b.controls("37", b.norm_full(1.3))["bare base"].startswith(NOT_RUN)


@pytest.mark.parametrize("holding, want", [
    (15, "STRICT_PASS"), (14, "LENIENT_PASS"), (12, "LENIENT_PASS"), (11, "FAIL"), (8, "FAIL"), (7, "CATASTROPHIC"),
])
def test_46_pair_counts(holding, want):
    assert judge("46", b.replication(holding)) == want


@pytest.mark.parametrize("seeds", [1, 2, 4])
def test_46_fewer_pairs_than_declared_is_never_strict(seeds):
    """Every pair holds, but the run has 3 x seeds < 15 pairs: at most LENIENT."""
    assert judge("46", b.replication(holding=99, seeds=seeds)) == "LENIENT_PASS"


def test_46_a_pair_exactly_on_the_ratio_bar_does_not_hold():
    cells = [{**x, "nll": 100 * 2.302585} for x in b.replication(15)]  # norm ppl == full ppl in every pair
    assert judge("46", cells, max_ppl_ratio=1.0 + 1e-9) == "STRICT_PASS"
    assert judge("46", cells, max_ppl_ratio=1.0) == "CATASTROPHIC"  # the rule is norm/full < bar


def test_46_control_is_the_bare_base_pair_by_pair():
    assert b.controls("46", b.replication(15, base_ratio=1.42)) == {"bare base": "STRICT_PASS"}
    assert b.controls("46", b.replication(15, base_ratio=2.5)) == {"bare base": "CATASTROPHIC"}
    assert b.controls("46", b.replication(15))["bare base"].startswith(NOT_RUN)


def test_49_general_tolerance_and_size():
    assert judge("49", b.shootout(20.9)) == "STRICT_PASS"  # 4.5 % worse on general text: allowed
    assert judge("49", b.shootout(21.1)) == "CATASTROPHIC"  # 5.5 % worse: not dominating
    assert judge("49", b.shootout(20.0, norm_bytes=5000)) == "CATASTROPHIC"  # bigger than LoRA
    assert judge("49", b.shootout(20.0, norm_bytes=100)) == "CATASTROPHIC"  # as big as LoRA: a tie is no win
    assert judge("49", b.shootout(20.0, norm_personal=11.0)) == "CATASTROPHIC"  # personal ppl tied with LoRA


def test_49_user_counts():
    cells = [x for x in b.shootout() if x["user"] != "s"] + [x for x in b.shootout(norm_personal=11.5)
                                                             if x["user"] == "s"]
    assert judge("49", cells) == "LENIENT_PASS"  # 2 of 3 users
    assert judge("49", b.shootout(users=("p", "n"))) == "LENIENT_PASS"  # 2 users, both dominate: not STRICT


def test_49_control_is_the_bare_base():
    assert b.controls("49", b.shootout()) == {"bare base": "CATASTROPHIC"}  # the base (13) is worse than LoRA
    assert b.controls("49", b.shootout(base_personal=10.9)) == {"bare base": "STRICT_PASS"}


@pytest.mark.parametrize("imps, want", [
    ([0.30 * UP] * 3, "STRICT_PASS"),
    ([0.30 * UP, 0.30 * UP, 0.30 * DOWN], "LENIENT_PASS"),
    ([0.15 * UP, 0.15 * UP, 0.0], "LENIENT_PASS"),
    ([0.15 * UP, 0.15 * DOWN, 0.1], "FAIL"),
    ([0.0, -0.1, -0.2], "CATASTROPHIC"),
    ([0.01, -0.1, -0.2], "FAIL"),
    ([0.5, 0.5], "LENIENT_PASS"),  # 2 users: fewer than STRICT's 3
])
def test_52_improvement_thresholds(imps, want):
    assert judge("52", b.ternary_users(imps)) == want


def test_52_control_random_tokens_on_the_ternary_base():
    name = "norm adapter of random tokens on the ternary base"
    assert b.controls("52", b.ternary_users([0.5] * 3, [0.4] * 3)) == {name: "STRICT_PASS"}
    assert b.controls("52", b.ternary_users([0.5] * 3, [0.0] * 3)) == {name: "CATASTROPHIC"}
    assert b.controls("52", b.ternary_users([0.5] * 3))[name].startswith(NOT_RUN)


@pytest.mark.parametrize("ratios, want", [
    ([1.5 * DOWN] * 3, "STRICT_PASS"),
    ([1.5 * DOWN, 1.5 * DOWN, 1.5 * UP], "LENIENT_PASS"),
    ([2.0 * DOWN, 2.0 * DOWN, 2.0 * UP], "LENIENT_PASS"),
    ([2.0 * DOWN, 2.0 * UP, 2.0 * UP], "CATASTROPHIC"),  # > 1.1x raw is also worse than no adapter (11)
    ([1.0, 1.0], "LENIENT_PASS"),  # 2 users: fewer than STRICT's 3
])
def test_53_int8_ratio_thresholds(ratios, want):
    assert judge("53", b.compress(ratios, none_ppl=30.0 if want != "CATASTROPHIC" else 11.0)) == want


def test_53_worse_than_no_adapter_and_ties():
    assert judge("53", b.compress([1.05, 1.05, 1.0], none_ppl=10.4)) == "CATASTROPHIC"  # 2 users above none
    assert judge("53", b.compress([1.0] * 3, none_ppl=10.0)) == "STRICT_PASS"  # equal to no adapter: not worse


def test_53_side_verdicts_judge_the_other_schemes():
    bet = get_bet("53")
    cells = b.compress([1.0] * 3, none_ppl=30.0, delta_ratio=2.5)
    assert bet.side_verdicts(cells, bet.criteria) == {"int8-channel": "FAIL", "int8-delta": "FAIL"}
    assert bet.verdict(cells, bet.criteria) == "STRICT_PASS"


def test_53_controls_bare_base_and_an_int8_file_of_the_base_gains():
    got = b.controls("53", b.compress([1.0] * 3, none_ppl=11.0))
    assert got == {"bare base": "STRICT_PASS", "int8 file of the base's own gains": "STRICT_PASS"}
    got = b.controls("53", b.compress([1.0] * 3, none_ppl=16.0))  # base 1.6x raw: over STRICT's 1.5x
    assert set(got.values()) == {"LENIENT_PASS"}


@pytest.mark.parametrize("bet_id, mine, rival", [("54", "own", "average"), ("55", "own", "ensemble"),
                                                 ("60", "real", "random")])
@pytest.mark.parametrize("factors, want", [
    ([0.95 * DOWN] * 3, "STRICT_PASS"),
    ([0.95 * DOWN, 0.95 * DOWN, 0.95 * UP], "LENIENT_PASS"),
    ([0.95 * DOWN, 0.97, 0.97], "FAIL"),
    ([0.95 * DOWN, 1.01, 1.01], "CATASTROPHIC"),  # the rival is better for 2 users
    ([0.9, 0.9], "LENIENT_PASS"),  # 2 users: fewer than STRICT's 3
])
def test_head_to_head_bets(bet_id, mine, rival, factors, want):
    assert judge(bet_id, b.pairs(mine, rival, factors)) == want


def test_head_to_head_ties():
    """60 counts a tie as a loss (random <= real); 54 and 55 do not (rival < own)."""
    assert judge("60", b.pairs("real", "random", [0.9, 1.0, 1.0])) == "CATASTROPHIC"
    assert judge("54", b.pairs("own", "average", [0.9, 1.0, 1.0])) == "FAIL"
    assert judge("55", b.pairs("own", "ensemble", [0.9, 1.0, 1.0])) == "FAIL"


@pytest.mark.parametrize("steer, want", [
    ([9.9, 9.9, 9.9], "STRICT_PASS"), ([9.9, 9.9, 10.1], "LENIENT_PASS"), ([9.9, 10.1, 10.1], "FAIL"),
    ([10.1] * 3, "CATASTROPHIC"), ([10.0] * 3, "CATASTROPHIC"),  # a tie is not a win
    ([9.9, 9.9], "LENIENT_PASS"),  # 2 users: fewer than STRICT's 3
])
def test_58_users_won(steer, want):
    assert judge("58", b.steer(steer)) == want


@pytest.mark.parametrize("own, want", [
    ([9.5 * DOWN] * 3, "STRICT_PASS"),
    ([9.5 * DOWN, 9.5 * DOWN, 9.5 * UP], "LENIENT_PASS"),
    ([9.5 * DOWN, 9.6, 9.6], "FAIL"),
    ([9.6, 10.5, 10.5], "CATASTROPHIC"),  # own best for 1/3 users
    ([9.6, 10.0, 10.0], "CATASTROPHIC"),  # a tie with a rival is not "own best"
    ([9.0, 9.0], "LENIENT_PASS"),  # 2 users, both won: fewer than the bet's 3
])
def test_61_confusion(own, want):
    assert judge("61", b.confusion(own)) == want


def scale(won: int, users: int = 10, seeds=(0, 1, 2)) -> list:
    return b.confusion([9.0] * won + [9.8] * (users - won), seeds=seeds, kind="confusion")


@pytest.mark.parametrize("cells, want", [
    (scale(9), "STRICT_PASS"),                 # 90 %: the bar
    (scale(8), "LENIENT_PASS"),                # 80 %
    (scale(6), "LENIENT_PASS"),                # 60 % > 50 %
    (scale(5), "FAIL"),                        # 50 %: LENIENT needs more than half
    (scale(3, users=12), "CATASTROPHIC"),      # 25 %: the bar
    (scale(4, users=12), "FAIL"),
    (scale(9, users=9), "LENIENT_PASS"),       # 100 % of 9 users: fewer than the declared 10
    (scale(10, seeds=(0,)), "LENIENT_PASS"),   # 1 seed of the declared 3
])
def test_scale_protocol(cells, want):
    assert judge("scale_protocol", cells) == want


def test_scale_protocol_side_verdict_has_no_catastrophic_tier_and_random_control():
    bet = get_bet("scale_protocol")
    cells = scale(1, users=12, seeds=(0,))
    assert bet.verdict(cells, bet.criteria) == "CATASTROPHIC"
    assert list(bet.side_verdicts(cells, bet.criteria).values()) == ["FAIL"]
    name = "norm adapter of random tokens as the user's own"
    assert bet.controls(cells, bet.criteria)[name].startswith(NOT_RUN)
    users = sorted({x["user"] for x in cells})
    rand = [b.c(9.0, kind="random", user=u, seed=0) for u in users]
    assert bet.controls(cells + rand, bet.criteria) == {name: "LENIENT_PASS"}  # 100 %, but 1 seed


@pytest.mark.parametrize("at_check, at_gone, want", [
    (0.051, None, "STRICT_PASS"),   # keeps 51 % of a 0.1-nat margin
    (0.049, None, "FAIL"),          # 49 %
    (0.0, None, "FAIL"),            # margin gone at 0.1 (a tie with the base)
    (0.2, 0.0, "CATASTROPHIC"),     # gone (tie) at sigma 1e-3
    (0.2, -0.01, "CATASTROPHIC"),
])
def test_63_margin_rule(at_check, at_gone, want):
    assert judge("63", b.noise(b.margins(0.1, at_check, at_gone))) == want


def test_63_a_negative_margin_is_never_kept():
    """With no noiseless margin (own worse than the base), 'keeping half of it' is no win: margin(0.1) must be > 0."""
    assert judge("63", b.noise(b.margins(-0.1, -0.01, 0.01))) == "FAIL"


def test_63_user_counts():
    cells = b.noise(b.margins(0.1, 0.06), users=("p", "n")) + b.noise(b.margins(0.1, 0.04), users=("s",))
    assert judge("63", cells) == "LENIENT_PASS"
    assert judge("63", b.noise(b.margins(0.1, 0.2), users=("p", "n"))) == "LENIENT_PASS"  # 2 users only


def test_63_controls_when_run_and_not_run():
    cells = b.noise(b.margins(0.1, 0.2))
    got = b.controls("63", cells)
    assert len(got) == 2 and all(v.startswith(NOT_RUN) for v in got.values())
    cells += b.noise(b.margins(0.001, 0.05), adapter="random", base=False)  # noise alone gives an adapter a margin
    cells += b.noise(b.margins(0.02, -0.01), adapter="other", base=False)
    got = b.controls("63", cells)
    assert list(got.values()) == ["STRICT_PASS", "FAIL"]


@pytest.mark.parametrize("cells, want", [
    (b.lr_grid(won=3), "STRICT_PASS"),
    (b.lr_grid(won=2), "STRICT_PASS"),                       # STRICT: >= 2 of 3 users
    (b.lr_grid(won=1), "LENIENT_PASS"),                      # 1 won, own best for 3/3
    (b.lr_grid(general=1.05 * UP), "LENIENT_PASS"),
    (b.lr_grid(general=1.10 * DOWN), "LENIENT_PASS"),
    (b.lr_grid(general=1.10 * UP), "FAIL"),
    (b.lr_grid(general=1.25 * UP), "CATASTROPHIC"),
    (b.lr_grid(tuned=5e-5), "CATASTROPHIC"),                 # tuned lr is the catalogue's: "under-trained" refuted
    (b.lr_grid(won=2, users=("p", "n")), "FAIL"),            # 2 users, both won: fewer than declared, not STRICT
])
def test_lr_sensitivity(cells, want):
    assert judge("lr_sensitivity", cells) == want


def test_scale_protocol_tuned_arm_is_judged_apart_from_the_catalogue_arm():
    """The tuned-lr arm (kind tuned_confusion) gets its own side verdict, over the base rows it shares; the
    pre-registered verdict reads the catalogue-lr matrix only."""
    bet = get_bet("scale_protocol")
    catalogue = scale(1, users=12, seeds=(0,))
    tuned = [{**x, "kind": "tuned_confusion", "lr": 2e-3} for x in scale(12, users=12, seeds=(0,))
             if x["adapter"] != "base"]
    cells = catalogue + tuned
    assert bet.verdict(cells, bet.criteria) == "CATASTROPHIC"  # unchanged by the tuned cells
    side = bet.side_verdicts(cells, bet.criteria)
    assert side["at the tuned norm lr 0.002 (lr_sensitivity's)"] == "LENIENT_PASS"  # 12/12 won, but 1 seed of 3
    assert "TUNED ARM (norm lr 0.002)" in bet.summary(cells) and "12/12" in bet.summary(cells).split("TUNED")[1]
    assert list(bet.side_verdicts(catalogue, bet.criteria)) == ["by the catalogue's wording (no CATASTROPHIC tier)"]


def test_scale_trend_row_reads_the_confusion_matrix_and_rivals():
    """The scale report's numbers for one base: own vs base / best other per user, LoRA vs norm, bytes."""
    from experiments.bets.scale_protocol import trend_row, trend_table

    cells = scale(2, users=3, seeds=(0,))  # own 9.0 for p, n (wins by 10 %), 9.8 for s; others and base 10.0
    cells[3] = {**cells[3], "bytes": 1000, "train_s": 5.0}  # the first adapter's own cell records its file
    cells += [b.c(8.0, kind="method", method="lora", user=u, seed=0, bytes=50_000) for u in ("p", "n", "s")]
    r = trend_row(cells)
    assert (r["users"], r["own_best"], r["won_5pct"], r["lora_beats_norm"]) == (3, 3, 2, 3)
    assert r["gain_vs_base"]["median"] == pytest.approx(0.1) and r["gain_vs_base"]["min"] == pytest.approx(0.02)
    assert r["lora_gain_vs_base"]["max"] == pytest.approx(0.2) and r["bytes"] == {"norm": 1000, "lora": 50_000}
    assert trend_row(cells, "tuned") is None  # no tuned arm in these cells
    table = trend_table([("b (1M)", "FAIL", r)])
    assert "| b (1M) | catalogue | FAIL | 3 | 3/3 | 2/3 |" in table and "215 MB / 10.8 GB" in table
    assert r["full_users"] == 0 and "| +20.0 % (+20.0 to +20.0) | — |" in table  # LoRA vs base, then no full FT
    full = cells + [b.c(12.0, kind="method", method="full", user="p", seed=0),
                    b.c(9.5, kind="method", method="full", user="n", seed=0)]
    r = trend_row(full)  # full FT for 2 of the 3 users: 20 % above the base, 5 % below it
    assert r["full_users"] == 2 and r["full_gain_vs_base"]["min"] == pytest.approx(-0.2)
    assert "| -7.5 % (-20.0 to +5.0) (2) |" in trend_table([("b (1M)", "FAIL", r)])


def test_scale_trend_plot_has_one_tick_per_run_and_a_panel_for_the_random_control(tmp_path):
    """Two runs of one base (a stopped fp32 one, a bf16 one) get ticks of their own; arms share a run's tick."""
    from experiments.bets.scale_protocol import TREND_PANELS, ScaleRun, trend_plot, trend_rows

    cells = scale(2, users=3, seeds=(0,))
    runs = [ScaleRun("qwen2.5-coder-0.5b", "partial: 14 units", cells, "fp32", True),
            ScaleRun("qwen2.5-coder-0.5b", "partial: 89 units (bf16)", cells, "bf16", True),
            ScaleRun("smollm2-135m-instruct", "CATASTROPHIC", cells)]
    rows = trend_rows(runs)
    assert [r["tick"] for _, _, r in rows] == ["630M\nfp32\npartial", "630M\nbf16\npartial", "135M\nfp32"]
    assert "real_vs_random" in dict(TREND_PANELS)
    rows.append((rows[1][0], rows[1][1], {**rows[1][2], "arm": "tuned"}))  # an arm shares its run's tick
    import matplotlib.image

    path = trend_plot(rows, tmp_path)
    assert path == tmp_path / "scale_trend.png" and matplotlib.image.imread(path).shape[1] > 1000


def test_scale_protocol_summary_and_control_over_subsets_of_users():
    """Full FT for the first user of each kind and --random-users N: the summary and the random-token control
    count only the users that have those cells (the 0.5B / 1.5B protocols), instead of failing at the end."""
    bet = get_bet("scale_protocol")
    cells = scale(10, users=12, seeds=(0,))  # u0..u9 won (own 9.0), u10, u11 not (9.8); others and base 10.0
    cells += [b.c(7.0, kind="method", method="full", user=u, seed=0) for u in ("u0", "u5")]
    cells += [b.c(9.99, kind="random", user=u, seed=0) for u in ("u0", "u10")]  # u0 beats it by 10 %, u10 not
    summary = bet.summary(cells)
    assert "norm beats full for 0/2" in summary and "real beats random-token control by >= 5 % for 1/2" in summary
    name = "norm adapter of random tokens as the user's own"
    # random as own: 9.99 vs every other adapter at 10.0 is not a 5 % win for either user: 0 of 2
    assert bet.controls(cells, bet.criteria) == {name: "CATASTROPHIC"}
    better = [x for x in cells if x.get("kind") != "random"] + [
        b.c(9.0, kind="random", user=u, seed=0) for u in ("u0", "u10")]
    assert bet.controls(better, bet.criteria) == {name: "LENIENT_PASS"}  # 2/2 won, but 2 users and 1 seed


def test_scale_protocol_options_for_the_larger_bases(tmp_path):
    """--random-users and --eval-len reach the protocol (and only the bets that take them)."""
    from sharedllm.bets.harness import Options, check_options
    from sharedllm.bets.context import Context
    from sharedllm.errors import SharedLLMError

    opts = Options(quick=False, out=tmp_path, results=tmp_path, base="tiny", random_users=2, eval_len=1024)
    check_options(get_bet("scale_protocol"), opts)
    assert Context(get_bet("scale_protocol"), opts).text_len == 1024
    with pytest.raises(SharedLLMError, match="--random-users"):
        check_options(get_bet("61"), opts)
    with pytest.raises(SharedLLMError, match="--eval-len 0"):
        Options(eval_len=0)
