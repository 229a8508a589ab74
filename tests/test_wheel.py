"""A wheel built from this checkout and installed into a fresh venv runs without the checkout on its path:
`sharedllm --help`, `inspect --base tiny`, and the bets commands (one clear line without a bets dir; the checkout's
bets with --bets-dir). The venv reuses this interpreter's installed dependencies through a .pth file, so nothing
is downloaded; the wheel is built from a copy of the sources, so the checkout gets no build/ or egg-info."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel


def dependency_dirs() -> list[str]:
    """This interpreter's site-packages: where torch, transformers, pip and the rest are installed."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src_copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist")], capture_output=True, text=True, env=clean_env())
    assert built.returncode == 0, f"pip wheel (offline: the test extra's setuptools >= 70.1) failed:\n{built.stderr}"
    return next((tmp / "dist").glob("sharedllm-*.whl"))


def clean_env() -> dict:
    """No PYTHONPATH (it would put the checkout's src/ first) and no bets dir from the environment."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SHAREDLLM_BETS_DIR")}


@pytest.fixture(scope="module")
def env_bin(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    venv.create(tmp / "venv", with_pip=False)
    python = tmp / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "reuse_dependencies.pth").write_text("\n".join(dependency_dirs()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True, capture_output=True, env=clean_env())
    return tmp / "venv" / "bin"


def sharedllm(env_bin: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_bin / "sharedllm"), *argv], capture_output=True, text=True, timeout=300,
                          cwd=env_bin.parent, env={**clean_env(), "OMP_NUM_THREADS": "1"})


def test_the_wheel_is_what_runs(env_bin):
    out = subprocess.run([str(env_bin / "python"), "-c", "import sharedllm.bets.catalogue as c; print(c.__file__)"],
                         capture_output=True, text=True, cwd=env_bin.parent, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(env_bin.parent), out.stdout
    help_ = sharedllm(env_bin, "--help")
    assert help_.returncode == 0 and "bets" in help_.stdout and "inspect" in help_.stdout, help_.stderr


def test_bets_without_a_bets_dir_say_where_they_looked(env_bin):
    for argv in (["bets", "list"], ["bet", "37", "--quick"]):
        r = sharedllm(env_bin, *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "no bets dir found; looked at:" in lines[0] and "--bets-dir <checkout>/experiments/bets" in lines[0]


def test_bets_list_with_the_checkouts_bets_dir(env_bin):
    r = sharedllm(env_bin, "bets", "list", "--json", "--bets-dir", str(REPO / "experiments" / "bets"))
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    committed = json.loads((REPO / "experiments" / "bets" / "results" / "37_norm_only.json").read_text())
    assert listed["bets"]["37"] == committed["verdict"] and "chat_cohort" in listed["bets"]


def test_adapt_and_inspect_on_the_tiny_base(env_bin, tmp_path):
    text, out = REPO / "data" / "corpora" / "programmer" / "cpython_asyncio.txt", tmp_path / "u.safetensors"
    r = sharedllm(env_bin, "adapt", "--text", str(text), "--out", str(out), "--base", "tiny", "--steps", "2",
                  "--seq", "32", "--window", "32", "--eval-tokens", "256", "--json")
    assert r.returncode == 0 and out.is_file(), r.stderr
    i = sharedllm(env_bin, "inspect", str(out), "--base", "tiny", "--json")
    assert i.returncode == 0 and json.loads(i.stdout)["method"] == "norm", i.stderr
