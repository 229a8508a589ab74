"""A wheel built from this checkout and installed into a fresh venv runs without the checkout on its path:
`sharedllm --help` (the console script), `adapt`, `inspect`, `eval`, `compress`, `export`, `quantize` and `serve`
on `--base tiny`, and the bets commands (one clear
line without a bets dir; the checkout's bets with --bets-dir). The venv reuses this interpreter's installed dependencies through a .pth file, so nothing
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


DRIVER = """
import contextlib, io, json, sys
import sharedllm
from sharedllm.cli import main

out = {"package": sharedllm.__file__}
for name, argv in json.loads(sys.argv[1]).items():
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out[name] = [rc, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ran(env_bin, tmp_path_factory) -> dict:
    """The commands, through the console script's entry point, in one process of the venv (each process imports
    torch and transformers: a minute of disk reads on a busy machine)."""
    text = REPO / "data" / "corpora" / "programmer" / "cpython_asyncio.txt"
    adapter = tmp_path_factory.mktemp("adapter") / "u.safetensors"
    cases = {"help": ["--help"], "list": ["bets", "list"], "bet": ["bet", "37", "--quick"],
             "list_dir": ["bets", "list", "--json", "--bets-dir", str(REPO / "experiments" / "bets")],
             "adapt": ["adapt", "--text", str(text), "--out", str(adapter), "--base", "tiny", "--steps", "2",
                       "--seq", "32", "--window", "32", "--eval-tokens", "256", "--json"],
             "inspect": ["inspect", str(adapter), "--base", "tiny", "--json"],
             "eval": ["eval", "--text", str(text), "--adapter", str(adapter), "--base", "tiny", "--window", "32",
                      "--eval-tokens", "256", "--json"],
             "compress": ["compress", "--adapter", str(adapter), "--scheme", "int8", "--out",
                          str(adapter.with_name("u8.safetensors")), "--base", "tiny", "--json"],
             "export": ["export", "--adapter", str(adapter), "--out", str(adapter.with_name("hf")), "--base", "tiny",
                        "--json"],
             "quantize": ["quantize", "--method", "absmean", "--repair-steps", "0", "--out",
                          str(adapter.with_name("t.safetensors")), "--base", "tiny", "--json"]}
    r = subprocess.run([str(env_bin / "python"), "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True,
                       timeout=600, cwd=env_bin.parent, env={**clean_env(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_console_script_and_the_package_are_the_wheels(env_bin, ran):
    assert Path(ran["package"]).is_relative_to(env_bin.parent), ran["package"]
    rc, out, err = ran["help"]
    assert rc == 0 and "bets" in out and "inspect" in out, err
    script = (env_bin / "sharedllm").read_text()  # run as `sharedllm`: this venv's python, sharedllm.cli's main
    assert script.startswith(f"#!{env_bin / 'python'}") and "from sharedllm.cli import main" in script, script


def test_bets_without_a_bets_dir_say_where_they_looked(ran):
    for name in ("list", "bet"):
        rc, _, err = ran[name]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert "no bets dir found; looked at:" in lines[0] and "--bets-dir <checkout>/experiments/bets" in lines[0]


def test_bets_list_with_the_checkouts_bets_dir(ran):
    rc, out, err = ran["list_dir"]
    assert rc == 0, err
    listed = json.loads(out)
    committed = json.loads((REPO / "experiments" / "bets" / "results" / "37_norm_only.json").read_text())
    assert listed["bets"]["37"] == committed["verdict"] and "chat_cohort" in listed["bets"]


def test_adapt_and_inspect_on_the_tiny_base(ran):
    rc, _, err = ran["adapt"]
    assert rc == 0, err
    rc, out, err = ran["inspect"]
    assert rc == 0 and json.loads(out)["method"] == "norm", err


def test_eval_compress_export_quantize_on_the_tiny_base(ran):
    for name in ("eval", "compress", "export", "quantize"):
        rc, out, err = ran[name]
        assert rc == 0 and json.loads(out), f"{name}: {err}"
    assert json.loads(ran["compress"][1])["scheme"] == "int8"
    assert json.loads(ran["quantize"][1])["method"] == "absmean"


def test_serve_from_the_wheel_answers_health(env_bin, tmp_path):
    """`sharedllm serve --base tiny` (the console script of the venv) comes up, answers /health and serves the
    playground's files from the wheel's package data."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "SHAREDLLM_ADMIN_TOKEN": "a" * 40}
    proc = subprocess.Popen([str(env_bin / "sharedllm"), "serve", "--base", "tiny", "--port", str(port), "--store",
                             str(tmp_path / "store")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, status = time.monotonic() + 300, None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    status = r.status
            except OSError:
                time.sleep(1)
        assert status == 200, proc.stderr.read().decode() if proc.poll() is not None else "no answer in 300 s"
        for path, media in (("/", "text/html"), ("/static/playground.js", "text/javascript")):  # package data
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith(media), path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
