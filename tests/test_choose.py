"""The per-user format choice (issue 32 item 3): the shipping rule on constructed numbers (boundaries on both sides,
none beating the base), the same rule in compress --policy, candidate formats, the dev slice, choose_format on the
tiny base, and `sharedllm adapt --method auto` end to end."""
import json
import math

import pytest
import torch

from sharedllm import wire
from sharedllm.choose import (DEFAULT_CANDIDATES, choose_format, dev_split, parse_candidates, parse_format,
                              render_table)
from sharedllm.cli import main
from sharedllm.data import load_user
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import evaluate_on, load_adapted
from sharedllm.quant.policy import RAW, Candidate, decide
from sharedllm.rule import judge
from sharedllm.train import TrainConfig

NORM, IA3, LORA = 71_000, 116_000, 2_450_000  # bytes, as the default base writes them (roughly)


def chosen(norm, ia3, lora, base=12.0, tolerance=0.02):
    return judge([("norm", NORM, norm), ("ia3", IA3, ia3), ("lora-r4", LORA, lora)], base, tolerance)["chosen"]


def test_the_smallest_within_tolerance_of_the_best_ships():
    assert chosen(10.15, 10.5, 10.0) == "norm"  # 1.5 % over the best: the smallest, accepted
    assert chosen(10.5, 10.15, 10.0) == "ia3"  # norm 5 % over: refused; ia3 next smallest, within
    assert chosen(10.5, 10.4, 10.0) == "lora-r4"  # only the best is within 2 %
    assert chosen(9.0, 10.0, 9.5) == "norm"  # the smallest is itself the best


def test_boundary_exactly_at_the_tolerance_is_accepted_just_above_is_not():
    assert chosen(10.2, 11.0, 10.0) == "norm"  # exactly 2 % over the best (10.0 x 1.02): accepted
    assert chosen(10.2 + 1e-9, 11.0, 10.0) == "lora-r4"  # just above: refused
    assert chosen(10.2 - 1e-9, 11.0, 10.0) == "norm"
    for best in (3.7, 17.31, 1234.5):  # float rounding of best x 1.02 never refuses a value exactly at it
        at = best * 1.02
        assert judge([("small", 1, at), ("big", 2, best)], 1e9)["chosen"] == "small"
        assert judge([("small", 1, at * (1 + 1e-9)), ("big", 2, best)], 1e9)["chosen"] == "big"
    assert judge([("a", 1, 10.5), ("b", 2, 10.0)], 12.0, tolerance=0.05)["chosen"] == "a"  # 5 %: at it
    assert judge([("a", 1, 10.5), ("b", 2, 10.0)], 12.0, tolerance=0.049)["chosen"] == "b"
    assert judge([("a", 1, 10.0), ("b", 2, 10.0)], 12.0, tolerance=0.0)["chosen"] == "a"  # 0: ties with the best


def test_boundary_beating_the_base_is_strict():
    assert chosen(12.0, 13.0, 11.9) == "lora-r4"  # norm within 2 % of the best but equal to the base: no gain
    assert chosen(11.999, 13.0, 11.9) == "norm"  # just below the base: accepted
    v = judge([("norm", NORM, 12.0), ("lora-r4", LORA, 11.9)], 12.0)
    norm = next(r for r in v["rows"] if r["name"] == "norm")
    assert norm["within_tolerance"] and not norm["beats_base"] and not norm["accepted"]


def test_when_none_beats_the_base_nothing_is_chosen():
    v = judge([("norm", NORM, 12.0), ("ia3", IA3, 12.5), ("lora-r4", LORA, 13.0)], 12.0)
    assert v["chosen"] is None and v["best_ppl"] == 12.0 and not any(r["accepted"] for r in v["rows"])
    assert judge([], 12.0)["chosen"] is None
    # compress --policy on the same numbers ships the raw adapter it was given (and says why)
    d = decide(12.0, Candidate(RAW, 70_000, 12.0), [Candidate("int8", 35_000, 12.3)])
    assert d["decision"] == RAW and "nothing beats no adapter" in d["note"]


def test_ties_and_non_finite():
    v = judge([("b", 100, 10.0), ("a", 100, 10.0), ("c", 100, 9.9)], 12.0)
    assert [r["name"] for r in v["rows"]] == ["c", "a", "b"] and v["chosen"] == "c"  # size, then ppl, then name
    assert judge([("b", 100, 10.0), ("a", 100, 10.0)], 12.0)["chosen"] == "a"
    v = judge([("nan", 1, math.nan), ("inf", 2, math.inf), ("ok", 3, 11.0)], 12.0)
    assert v["chosen"] == "ok" and v["best_ppl"] == 11.0
    assert [r["ppl_vs_best"] for r in v["rows"]][:2] == [None, None]
    for bad in (-0.01, math.nan, math.inf, "2%"):
        with pytest.raises(SharedLLMError, match="tolerance"):
            judge([("a", 1, 1.0)], 2.0, bad)


def test_compress_policy_applies_the_same_rule_at_its_boundaries():
    raw = Candidate(RAW, 2_450_000, 10.0, 2_449_000)
    at = Candidate("int4-g64", 700_000, 10.2, 699_000)  # exactly 2 % over raw, the best
    above = Candidate("int4-g64", 700_000, 10.2 + 1e-9, 699_000)
    mid = Candidate("int8", 1_300_000, 10.1, 1_299_000)
    assert decide(12.0, raw, [at, mid])["decision"] == "int4-g64"
    assert decide(12.0, raw, [above, mid])["decision"] == "int8"
    assert decide(12.0, raw, [above])["decision"] == RAW
    d = decide(12.0, raw, [Candidate("rank1+int4-g64", 200_000, 10.05, 199_000), at])
    assert d["decision"] == "rank1+int4-g64" and d["tolerance"] == 0.02


# ---- formats and the dev slice ----------------------------------------------------------------------------------
def test_candidate_formats():
    assert [f.name for f in parse_candidates(",".join(DEFAULT_CANDIDATES))] == ["norm", "ia3", "lora-r4"]
    assert parse_format("lora").name == "lora-r4"
    r8 = parse_format("lora-r8")
    assert r8.config.rank == 8 and r8.config.alpha == 16  # the default scale alpha / rank = 2
    f = parse_format("lora-r4+int4-g64")
    assert f.spec == "int4-g64" and f.trained == parse_format("lora-r4").trained  # trains once with lora-r4
    assert parse_format("lora-r4+rank2").spec == "rank2+float16"
    assert parse_format("norm+int8-delta").name == "norm+int8-delta"
    for bad, msg in (("norm-r2", "has no rank"), ("bogus", "unknown adapter method"), ("lora+int5", "scheme"),
                     ("LoRA r4", "METHOD")):
        with pytest.raises(SharedLLMError, match=msg):
            parse_format(bad)
    with pytest.raises(SharedLLMError, match="repeat"):
        parse_candidates("lora,lora-r4")
    with pytest.raises(SharedLLMError, match="at least one"):
        parse_candidates(" , ")


def test_the_dev_slice_is_the_training_pool_s_last_tenth():
    pool = torch.arange(1000)
    train, dev = dev_split(pool, 0.1, seq=16, window=32)
    assert torch.equal(train, pool[:900]) and torch.equal(dev, pool[900:])
    with pytest.raises(SharedLLMError, match="dev window"):
        dev_split(pool, 0.1, seq=16, window=128)
    with pytest.raises(SharedLLMError, match="dev fraction"):
        dev_split(pool, 0.0)


# ---- choose_format and the CLI on the tiny base ------------------------------------------------------------
@pytest.fixture
def user_file(tmp_path):
    from .conftest import CORPORA

    return CORPORA / "programmer" / "cpython_asyncio.txt"


def test_choose_format_ships_the_rule_s_choice_and_records_it(tiny, user_file):
    user = load_user(user_file, tiny.tokenizer)
    cfg = TrainConfig(steps=3, batch=2, seq=32)
    c = choose_format(tiny, user.train, "norm,lora-r4,lora-r4+int4-g64", cfg=cfg, window=64, max_tokens=256)
    t = c.table
    assert [r["format"] for r in t["candidates"]] == ["norm", "lora-r4+int4-g64", "lora-r4"]  # by bytes
    again = judge([(r["format"], r["bytes"], r["dev_ppl"]) for r in t["candidates"]], t["base_dev_ppl"])
    assert t["chosen"] == again["chosen"] and t["chosen"] is not None
    assert t["train_tokens"] == int(len(user.train) * 0.9) and t["dev_tokens"] == 256 and t["tolerance"] == 0.02
    lora, q4 = t["candidates"][2], t["candidates"][1]
    assert q4["scheme"] == "int4-g64" and q4["params"] == lora["params"] and q4["bytes"] < lora["bytes"] / 3
    assert q4["train_s"] == lora["train_s"]  # one training for both
    assert all(r["lr"] == {"norm": 2e-3, "lora": 1e-3}[r["method"]] for r in t["candidates"])  # the recipes'
    meta = wire.parse_file(c.data, "chosen")[1]
    assert meta["choice"] == json.loads(json.dumps(t)) and meta["base_fingerprint"] == tiny.fingerprint
    row = next(r for r in t["candidates"] if r["format"] == t["chosen"])
    assert len(c.data) > row["bytes"]  # the file as scored, plus the choice record
    # the shipped adapter is the one scored: its dev ppl again
    _, dev = dev_split(user.train, 0.1, 32, 64)
    assert evaluate_on(load_adapted(tiny, data=c.data).model, tiny, dev, 64, 256)["ppl"] == pytest.approx(
        row["dev_ppl"], rel=1e-6)
    assert "SHIP" in render_table(t)


def test_cli_adapt_auto_end_to_end(tiny, user_file, tmp_path, capsys):
    out = tmp_path / "auto.safetensors"
    args = ["adapt", "--method", "auto", "--base", "tiny", "--text", str(user_file), "--out", str(out),
            "--steps", "3", "--seq", "32", "--window", "64", "--eval-tokens", "256"]
    assert main(args + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = r["choice"]
    assert [c["format"] for c in t["candidates"]] == ["norm", "ia3", "lora-r4"]  # the defaults, by bytes
    assert r["chosen"] == t["chosen"] == judge([(c["format"], c["bytes"], c["dev_ppl"]) for c in t["candidates"]],
                                               t["base_dev_ppl"])["chosen"]
    loaded = load_adapted(tiny, out)
    assert loaded.meta["choice"] == t and loaded.meta["user_text"] == user_file.name
    assert loaded.method == {"norm": "norm", "ia3": "ia3", "lora-r4": "lora"}[r["chosen"]]
    assert r["bytes"] == out.stat().st_size and r["heldout_ppl_after"] > 0
    assert main(args) == 0  # the table
    text = capsys.readouterr().out
    assert "dev ppl" in text and "SHIP" in text and "rule: smallest candidate" in text


def test_cli_adapt_auto_writes_nothing_when_no_candidate_beats_the_base(tiny, user_file, tmp_path, capsys):
    out = tmp_path / "none.safetensors"
    # 0 steps: LoRA's B is 0 and (IA)^3's gains are 1, so each scores exactly the base's dev ppl: no gain
    assert main(["adapt", "--method", "auto", "--base", "tiny", "--text", str(user_file), "--out", str(out),
                 "--candidates", "lora-r4,ia3", "--steps", "0", "--seq", "32", "--window", "64",
                 "--eval-tokens", "256"]) == 1
    text = capsys.readouterr().out
    assert "no candidate beats the base" in text and "not better than the base" in text and not out.exists()


def test_cli_adapt_auto_refusals(tiny, user_file, tmp_path, capsys):
    base = ["adapt", "--base", "tiny", "--text", str(user_file)]
    assert main(base + ["--method", "auto", "--out-dir", str(tmp_path)]) == 2
    assert "one user" in capsys.readouterr().err
    assert main(base + ["--method", "auto", "--out", "x", "--lora-rank", "8"]) == 2
    assert "--candidates" in capsys.readouterr().err
    assert main(base + ["--method", "norm", "--out", "x", "--tolerance", "0.05"]) == 2
    assert "--method auto only" in capsys.readouterr().err
    assert main(base + ["--method", "auto", "--out", "x", "--candidates", "norm,nope"]) == 2
    assert "unknown adapter method" in capsys.readouterr().err
