"""Training snapshots (sharedllm.snapshot): a run stopped by SIGTERM part-way resumes to the adapter an uninterrupted
run gives, bit for bit on a CPU; a snapshot of another run, or a damaged one, is ignored."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sharedllm.bets.common import AdapterSpec, ensure_adapter, ensure_norm_adapters, snapshot_key
from sharedllm.fleet import train_fleet
from sharedllm.personalise import new_adapter, personalise
from sharedllm.snapshot import Snapshot
from sharedllm.train import TrainConfig

CFG = TrainConfig(steps=10, batch=2, seq=32, lr=1e-2)
KEY = {"run": "test"}


class StopAt(Snapshot):
    """A snapshot that sends this process a real SIGTERM after step `stop_at` (every step is snapshotted)."""

    def __init__(self, path, key, stop_at: int):
        super().__init__(path, key, every_s=0.0)
        self.stop_at = stop_at

    def after_step(self, step, *args):
        if step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        super().after_step(step, *args)


def _tokens(seed, n=3000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _equal(a, b):
    return all(torch.equal(a.params[n], b.params[n]) for n in a.params)


@pytest.mark.parametrize("method", ["norm", "lora"])
def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_adapter(tiny, tmp_path, method):
    tokens = _tokens(1)
    whole = personalise(tiny, tokens, method, CFG)
    path = tmp_path / "run.snapshot.safetensors"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        personalise(tiny, tokens, method, CFG, snapshot=StopAt(path, KEY, stop_at=4))
    assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before, "the trainer must put the old SIGTERM handler back"
    assert path.is_file()
    resumed = personalise(tiny, tokens, method, CFG, snapshot=Snapshot(path, KEY))
    assert resumed.result.steps == CFG.steps
    assert resumed.result.losses == whole.result.losses
    assert _equal(resumed, whole)
    assert not _equal(whole, new_adapter(tiny, method, seed=CFG.seed)), "the adapter must have trained"


def test_a_snapshot_of_another_run_or_a_damaged_one_is_ignored(tiny, tmp_path, capsys):
    tokens = _tokens(2)
    whole = personalise(tiny, tokens, "norm", CFG)
    path = tmp_path / "run.snapshot.safetensors"
    with pytest.raises(SystemExit):
        personalise(tiny, tokens, "norm", CFG, snapshot=StopAt(path, {"run": "other"}, stop_at=3))
    other = personalise(tiny, tokens, "norm", CFG, snapshot=Snapshot(path, KEY))
    assert other.result.losses == whole.result.losses and _equal(other, whole)
    assert "written for another run" in capsys.readouterr().err
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      " + os.urandom(64))
    damaged = personalise(tiny, tokens, "norm", CFG, snapshot=Snapshot(path, KEY))
    assert _equal(damaged, whole)
    assert "ignoring training snapshot" in capsys.readouterr().err


def test_a_fleet_pass_stopped_by_sigterm_resumes_to_the_uninterrupted_adapters(tiny, tmp_path):
    users = {f"u{i}": _tokens(10 + i) for i in range(2)}
    whole = train_fleet(tiny, users, CFG)
    path = tmp_path / "fleet.snapshot.safetensors"
    with pytest.raises(SystemExit):
        train_fleet(tiny, users, CFG, snapshot=StopAt(path, KEY, stop_at=6))
    resumed = train_fleet(tiny, users, CFG, snapshot=Snapshot(path, KEY))
    for u in users:
        assert resumed[u].result.losses == whole[u].result.losses
        assert _equal(resumed[u], whole[u])


def test_the_bets_adapters_leave_no_snapshot_behind(tiny, tmp_path):
    cfg = TrainConfig(steps=3, batch=2, seq=32)
    one = ensure_adapter(tiny, "kind/alone", _tokens(3), "norm", cfg, "", tmp_path)
    specs = [AdapterSpec(f"kind/u{i}", _tokens(20 + i), cfg) for i in range(2)]
    two = ensure_norm_adapters(tiny, specs, tmp_path)
    assert one.is_file() and all(p.is_file() for p in two)
    assert not list(tmp_path.rglob("*snapshot*"))
    assert snapshot_key(tiny, specs[:1], "norm", "fp32") != snapshot_key(tiny, specs[1:], "norm", "fp32")


def test_adapt_stopped_by_sigterm_says_how_to_resume_and_the_same_command_resumes(user_text, tmp_path):
    out = tmp_path / "u.safetensors"
    argv = [sys.executable, "-m", "sharedllm.cli", "adapt", "--text", str(user_text), "--out", str(out),
            "--base", "tiny", "--steps", "100", "--seq", "32", "--window", "32", "--lr", "1e-3"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:  # bars are off without a terminal: a milestone line every 10 % of the steps
        if "step 10/100" in line:
            proc.send_signal(signal.SIGTERM)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    snap = tmp_path / "u.snapshot.safetensors"
    assert snap.is_file() and not out.exists()
    again = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    step = int(again.stderr.split("at step ")[1].split("/")[0])
    assert 10 <= step < 100, again.stderr
    assert json.loads(again.stdout)["steps"] == 100
    assert out.is_file() and not snap.exists()
