"""The bets harness: every bet's --quick run end to end, make-style reuse, verdicts recomputable from JSON."""
from __future__ import annotations

import json

import pytest

from experiments.bets import harness
from experiments.bets.harness import BETS, VERDICTS, Options, get_bet, run_bet

from .conftest import CORPORA

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
    from experiments.bets import report
    from experiments.bets.report import write_report

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
    from experiments.bets.context import Context

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
    assert set(json.loads(partial.read_text())["units"]) == {"base", "norm/seed0", "full/seed0", "norm/seed1"}
    monkeypatch.setattr(Context, "adapter", real)
    resumed = []
    monkeypatch.setattr(Context, "adapter", lambda self, *a, **k: resumed.append(a) or real(self, *a, **k))
    result = run_bet(bet, opts)
    assert len(resumed) == 1 and resumed[0][1] == "full"  # only the unit that was cut off is trained
    assert result["meta"]["resumed"]["units_reused"] == 4 and not partial.exists()
    assert sorted(result["config"]["seeds"]) == [0, 1] and len(result["cells"]) == 5 * 3  # base + 2 x (norm, full)
    assert set(result["extras"]["loss_curves"]) == {f"programmer/{m}/seed{s}" for m in ("norm", "full") for s in (0, 1)}


class BesideABusyWorker:
    """Bet 46 (quick, 1 seed) run in a thread while a stand-in process (`sleep`) holds the claim on full/seed0."""

    def __init__(self, tmp_path, monkeypatch):
        import subprocess
        import threading

        from experiments.bets.context import Checkpoint, Context

        monkeypatch.setattr(harness, "POLL_S", 0.1)
        self.said, self.trained, self.out, real = [], [], {}, Context.adapter
        monkeypatch.setattr(harness, "say", self.said.append)
        monkeypatch.setattr(Context, "adapter", lambda ctx, *a, **k: self.trained.append(a[1]) or real(ctx, *a, **k))
        self.bet = get_bet("46")
        self.opts = Options(quick=True, corpora=CORPORA, out=tmp_path / "out", results=tmp_path / "res", seeds=1)
        self.partial = tmp_path / "res" / "partial" / f"{self.bet.name}.json"
        self.result = tmp_path / "res" / f"{self.bet.name}.json"
        self.other = subprocess.Popen(["sleep", "120"])
        self.claim = Checkpoint(self.partial, {})._claim_file("full/seed0")
        self.claim.parent.mkdir(parents=True)
        self.claim.write_text(str(self.other.pid))
        self.worker = threading.Thread(target=lambda: self.out.update(run_bet(self.bet, self.opts)))
        self.worker.start()

    def wait_until_it_waits(self) -> None:
        import time

        deadline = time.monotonic() + 120
        while not any("waiting for 1 unit(s)" in m for m in self.said):  # it has done its part and now waits
            assert time.monotonic() < deadline and self.worker.is_alive()
            time.sleep(0.1)

    def other_dies(self) -> dict:
        self.other.kill()
        self.other.wait()
        self.worker.join(timeout=120)
        assert not self.worker.is_alive()
        return self.out


def test_two_workers_share_a_bet_and_a_dead_workers_unit_is_taken_over(tmp_path, monkeypatch):
    """A unit claimed by another live process is left to it; the run waits, then takes it over once that dies."""
    run = BesideABusyWorker(tmp_path, monkeypatch)
    try:
        run.wait_until_it_waits()
        assert run.trained == ["norm"]  # waiting: it did not touch the claimed unit
        assert "norm/seed0" in json.loads(run.partial.read_text())["units"]
    finally:
        out = run.other_dies()
    assert run.trained == ["norm", "full"]  # the dead worker's unit was taken over
    assert len(out["cells"]) == 3 * 3 and {c["method"] for c in out["cells"]} == {"none", "norm", "full"}
    assert not run.partial.exists() and not run.claim.exists()


def test_report_shows_bets_in_progress(tmp_path):
    from experiments.bets.report import write_report

    partial = tmp_path / "results" / "partial" / "46_replication.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({"stamp": {}, "units": {"norm/seed0": {}, "full/seed0": {}}}))
    out = write_report(tmp_path / "results", tmp_path / "REPORT.md", tmp_path / "plots")
    line = next(x for x in (tmp_path / "REPORT.md").read_text().splitlines() if x.startswith("| 46_replication"))
    assert "in progress: 2 unit(s)" in line and "full/seed0, norm/seed0" in line
    assert out["in_progress"] == {"46": ["full/seed0", "norm/seed0"]} and "46" in out["missing"]


def test_a_waiting_worker_reuses_the_result_another_worker_wrote(tmp_path, monkeypatch):
    run = BesideABusyWorker(tmp_path, monkeypatch)
    try:
        run.wait_until_it_waits()
        finished = {"bet": "46", "verdict": "FAIL", "cells": [], "by": "the other worker"}
        run.result.write_text(json.dumps(finished))
    finally:
        out = run.other_dies()
    assert out["by"] == "the other worker" and out["reused"] and run.trained == ["norm"]


def _claim_once(path: str, barrier, results) -> None:
    from experiments.bets.context import Checkpoint

    barrier.wait()
    results.put(Checkpoint(path, {"bet": "race"}).claim("unit/a"))
    barrier.wait()  # stay alive until every worker has tried: a dead claimer's unit may rightly be taken over


def test_a_unit_is_claimed_by_exactly_one_of_many_racing_workers(tmp_path):
    import multiprocessing as mp

    ctx, n = mp.get_context("fork"), 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claim_once, args=(str(tmp_path / "race.json"), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(results.get(timeout=5) for _ in range(n)) == [False] * (n - 1) + [True]


def test_a_finished_unit_is_not_claimed_again(tmp_path):
    from experiments.bets.context import Checkpoint

    cp = Checkpoint(tmp_path / "b.json", {"bet": "b"})
    assert cp.claim("unit/a")
    cp.put("unit/a", {"cells": [], "curves": {}, "users": [], "seeds": [], "wall_s": 0.0})
    assert not Checkpoint(tmp_path / "b.json", {"bet": "b"}).claim("unit/a")
