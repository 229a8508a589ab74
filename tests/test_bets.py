"""The bets harness: every bet's --quick run end to end, make-style reuse, verdicts recomputable from JSON."""
from __future__ import annotations

import json

import pytest

from sharedllm.bets import harness
from sharedllm.bets.catalogue import current
from sharedllm.bets.harness import VERDICTS, Options, get_bet, run_bet

from .conftest import CORPORA

BETS = current().bets
KEYS = {"bet", "version", "hypothesis", "criteria", "config", "cells", "verdict", "meta"}
CONFIG_KEYS = {"base_fingerprint", "users", "steps", "batch", "seq", "lr", "seeds", "eval"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bets_out")  # shared: adapters trained by one bet are reused by the next


@pytest.fixture(scope="module")
def res_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bets_results")


@pytest.mark.parametrize("bet_id", list(BETS))
def test_quick_run_every_bet(bet_id, out_dir, res_dir):
    """Every bet runs end to end on the tiny base (a MissingDependency is a failure, not an expected one)."""
    bet = get_bet(bet_id)
    tmp_path = res_dir
    opts = Options(quick=True, corpora=CORPORA, out=out_dir, results=tmp_path)
    result = run_bet(bet, opts)
    saved = json.loads((tmp_path / f"{bet.name}.json").read_text())
    assert KEYS <= set(saved) and CONFIG_KEYS <= set(saved["config"])
    assert saved["verdict"] in VERDICTS and saved["cells"]
    assert saved["version"] == bet.version and saved["config"]["quick"] is True and saved["config"]["base"] == "tiny"
    assert all(isinstance(v, (str, int, float, bool, type(None))) for c in saved["cells"] for v in c.values())
    assert result["written"] == str(tmp_path / f"{bet.name}.json")
    controls = saved["control_verdicts"]
    assert (bet.controls is None) == (controls == {})
    # a fresh run scores every control it defines: none is left "not run"
    assert all(v in VERDICTS for v in controls.values()), controls
    if bet_id in ("13", "52", "scale_protocol"):  # the ternary base it used: quantize settings and fingerprints
        record = saved["config"]["ternary"]
        assert record["method"] and isinstance(record["params"], dict) and len(record["fingerprint"]) == 64
        assert record["source_fingerprint"] == saved["config"]["base_fingerprint"]


def test_result_file_is_a_make_target(out_dir, tmp_path, monkeypatch):
    bet = get_bet("37")
    opts = Options(quick=True, corpora=CORPORA, out=out_dir, results=tmp_path)
    first = run_bet(bet, opts)
    monkeypatch.setattr(bet, "run", lambda ctx: pytest.fail("a reused result must not re-run the bet"))
    again = run_bet(bet, opts)
    assert again["reused"] and again["cells"] == json.loads(json.dumps(first["cells"]))
    monkeypatch.undo()
    forced = run_bet(bet, Options(quick=True, force=True, corpora=CORPORA, out=out_dir, results=tmp_path))
    assert "written" in forced
    # scores are cached by adapter file: the forced re-run reproduces the same numbers exactly
    assert [c["nll"] for c in forced["cells"]] == [c["nll"] for c in first["cells"]]


def test_options_a_bet_does_not_take_are_refused(tmp_path):
    with pytest.raises(harness.SharedLLMError, match="--users"):
        run_bet(get_bet("49"), Options(quick=True, users=["x"], results=tmp_path))
    with pytest.raises(harness.SharedLLMError, match="unknown bet"):
        get_bet("99")
    assert get_bet("adapter_shootout").id == "49"


def test_report_from_quick_results(res_dir, tmp_path):
    from sharedllm.bets import report
    from sharedllm.bets.report import write_report

    got = write_report(res_dir, tmp_path / "REPORT.md", tmp_path / "plots")
    rows = {x.split("|")[1].strip(): x.split("|") for x in (tmp_path / "REPORT.md").read_text().splitlines()
            if x.startswith("| ")}
    assert not got["mismatches"] and set(got["with_results"]) == set(BETS)
    for bet_id in got["with_results"]:  # each bet's own row carries the verdict its result file holds
        saved = json.loads((res_dir / f"{BETS[bet_id]}.json").read_text())
        assert rows[BETS[bet_id]][3].strip().startswith(f"**{saved['verdict']}**")
        assert rows[BETS[bet_id]][4].strip() == report.control_column(saved["control_verdicts"] or None)
    names = {p.split("/")[-1] for p in got["plots"]}
    assert {"confusion_matrix.png", "loss_curves.png", "pareto.png", "scale_confusion_matrix.png",
            "scale_protocol.png"} <= names
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    text = (tmp_path / "REPORT.md").read_text()  # the bets' own sections, from the quick results
    assert "## The chat cohort across sizes" in text and "## adapter_frontier_screen on tiny" in text
    assert "| qwen2.5-coder-1.5b | chat_scale | not run yet |" in text


def test_cli_bet_and_bets(out_dir, tmp_path, capsys):
    from sharedllm.cli import main

    assert main(["bet", "37", "--quick", "--corpora", str(CORPORA), "--out", str(out_dir),
                 "--results", str(tmp_path)]) == 0
    assert "bet 37 norm_only:" in capsys.readouterr().out
    assert main(["bets", "list", "--results", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["bets"]
    assert listed["37"] in VERDICTS and listed["49"] is None
    assert main(["bet", "49", "--quick", "--users", "a"]) == 2
    assert "does not take --users" in capsys.readouterr().err


def test_a_cut_off_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Long bets checkpoint each finished unit under results/partial/; a resumed run does only what is left."""
    from sharedllm.bets.context import Context
    from sharedllm.machine import cpu_model

    bet, calls = get_bet("46"), []
    opts = Options(quick=True, corpora=CORPORA, out=tmp_path / "out", results=tmp_path / "res", seeds=2)
    real = Context.adapter

    def cut_off_at_fourth(self, *a, **k):
        calls.append(a)
        if len(calls) == 4:
            raise KeyboardInterrupt("machine taken away")
        return real(self, *a, **k)

    monkeypatch.setattr(Context, "adapter", cut_off_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_bet(bet, opts)
    partial = tmp_path / "res" / "partial" / f"{bet.name}.json"
    saved = json.loads(partial.read_text())
    assert set(saved["units"]) == {"base", "norm/seed0", "full/seed0", "norm/seed1"}
    assert {u["machine"] for u in saved["units"].values()} == {cpu_model()}  # where each unit ran
    del saved["units"]["base"]["machine"]  # a unit from before units recorded it
    partial.write_text(json.dumps(saved))
    monkeypatch.setattr(Context, "adapter", real)
    resumed = []
    monkeypatch.setattr(Context, "adapter", lambda self, *a, **k: resumed.append(a) or real(self, *a, **k))
    result = run_bet(bet, opts)
    assert len(resumed) == 1 and resumed[0][1] == "full"  # only the unit that was cut off is trained
    assert result["meta"]["resumed"]["units_reused"] == 4 and not partial.exists()
    assert result["meta"]["unit_machines"] == {cpu_model(): 4, "not recorded": 1}
    assert sorted(result["config"]["seeds"]) == [0, 1] and len(result["cells"]) == 5 * 3  # base + 2 x (norm, full)
    assert set(result["extras"]["loss_curves"]) == {f"programmer/{m}/seed{s}" for m in ("norm", "full") for s in (0, 1)}


def test_report_shows_bets_in_progress(tmp_path):
    from sharedllm.bets.report import write_report

    partial = tmp_path / "results" / "partial" / "46_replication.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"stamp": {}, "units": {"norm/seed0": {}, "full/seed0": {}}}))
    out = write_report(tmp_path / "results", tmp_path / "REPORT.md", tmp_path / "plots")
    line = next(x for x in (tmp_path / "REPORT.md").read_text().splitlines() if x.startswith("| 46_replication"))
    assert "in progress: 2 unit(s)" in line and "full/seed0, norm/seed0" in line
    assert out["in_progress"] == {"46": ["full/seed0", "norm/seed0"]} and "46" in out["missing"]
