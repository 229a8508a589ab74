"""Bets are found by path: the library never imports `experiments`, building the CLI's parser imports no bets code,
and any folder that lists BETS is a bets dir (`--bets-dir`)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sharedllm.bets import catalogue
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError

REPO = Path(__file__).resolve().parents[1]
TOY_BET = '''from sharedllm.bets.harness import Bet, grade

BET = Bet(id="toy", slug="toy", version=1, hypothesis="a toy", criteria={}, run=lambda ctx: [],
          verdict=lambda cells, criteria: grade(True, True, False), summary=lambda cells: "toy")
'''


@pytest.fixture
def toy_dir(tmp_path):
    (tmp_path / "__init__.py").write_text('BETS = {"toy": "toy"}\n')
    (tmp_path / "toy.py").write_text(TOY_BET)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.json").write_text(json.dumps({"verdict": "STRICT_PASS"}))
    yield tmp_path
    catalogue.use()  # back to the checkout's bets for the tests that follow


def test_no_module_of_the_package_imports_experiments():
    hits = [str(f.relative_to(REPO)) for f in (REPO / "src").rglob("*.py")
            if re.search(r"^\s*(from|import) experiments\b", f.read_text(), re.M)]
    assert not hits


def test_building_the_parser_imports_no_bets_code():
    code = ("import sys; from sharedllm.cli import build_parser; build_parser(); "
            "print([m for m in sys.modules if m.startswith(('sharedllm.bets', 'experiments', '_sharedllm_bets'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_bets_dir_anywhere(toy_dir, capsys):
    assert main(["bets", "list", "--bets-dir", str(toy_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["bets"] == {"toy": "STRICT_PASS"} and listed["bets_dir"] == str(toy_dir.resolve())
    assert catalogue.current().module("toy").BET.verdict([], {}) == "STRICT_PASS"


def test_a_folder_that_is_not_a_bets_dir_is_one_clear_line(tmp_path, capsys):
    assert main(["bet", "37", "--quick", "--bets-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sharedllm bet: error: --bets-dir {tmp_path}: not a bets dir (no __init__.py listing BETS)"
    (tmp_path / "__init__.py").write_text("X = 1\n")
    with pytest.raises(SharedLLMError, match="defines no BETS"):
        _ = catalogue.find(tmp_path).bets
    catalogue.use()


def test_the_checkout_is_the_default(monkeypatch):
    monkeypatch.delenv(catalogue.ENV, raising=False)
    assert catalogue.find().path == (REPO / "experiments" / "bets").resolve()
    assert catalogue.current().default("CORPORA").resolve() == (REPO / "data" / "corpora").resolve()


def test_the_package_report_names_no_bet():
    text = (REPO / "src" / "sharedllm" / "bets" / "report.py").read_text()
    named = [m for b, m in catalogue.find().bets.items() if m in text or f'"{b}"' in text]
    assert not named


HOOKED = '''from pathlib import Path

from sharedllm.bets.harness import Bet, grade

BET = Bet(id="{name}", slug="{name}", version=1, hypothesis="a toy", criteria={{}}, run=lambda ctx: [],
          verdict=lambda cells, criteria: grade(True, True, False), summary=lambda cells: "toy")


def plots(results, folder):
    path = Path(folder) / "{name}.png"
    path.write_bytes(b"png of " + ",".join(sorted(results)).encode())
    return [path]
'''


def test_the_report_draws_each_bets_plots_hook_in_the_plot_order(tmp_path):
    from sharedllm.bets.report import make_plots

    (tmp_path / "__init__.py").write_text('BETS = {"a": "a", "b": "b", "c": "c"}\nPLOTS = ["c"]\n')
    for name in "abc":
        (tmp_path / f"{name}.py").write_text(HOOKED.format(name=name) if name != "b" else TOY_BET)
    catalogue.use(tmp_path)
    try:
        made = make_plots({"a": {}, "c": {}}, tmp_path / "plots")
    finally:
        catalogue.use()
    assert [Path(p).name for p in made] == ["c.png", "a.png"]
    assert (tmp_path / "plots" / "a.png").read_bytes() == b"png of a,c"
