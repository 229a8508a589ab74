"""Training snapshots (sharedllm.snapshot): a run stopped by SIGTERM part-way resumes to the adapter an uninterrupted
run gives, bit for bit on a CPU; a snapshot of another run, or a damaged one, is ignored."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sharedllm.snapshot as snapshot_module
from sharedllm.bets.common import (AdapterSpec, adapter_path, ensure_adapter, ensure_norm_adapters, sidecar,
                                   snapshot_key)
from sharedllm.fleet import train_fleet
from sharedllm.personalise import new_adapter, personalise
from sharedllm.snapshot import Snapshot, beside, for_method
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


@pytest.mark.parametrize("method", ["norm", "lora", "full"])
def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_adapter(tiny, tmp_path, method, capsys):
    tokens = _tokens(1)
    whole = personalise(tiny, tokens, method, CFG)
    path = tmp_path / "run.snapshot.safetensors"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        personalise(tiny, tokens, method, CFG, snapshot=StopAt(path, KEY, stop_at=4))
    assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before, "the trainer must put the old SIGTERM handler back"
    assert path.is_file()
    capsys.readouterr()
    resumed = personalise(tiny, tokens, method, CFG, snapshot=Snapshot(path, KEY))
    err = capsys.readouterr().err
    assert "resuming from training snapshot" in err and "ignoring" not in err, err
    assert resumed.result.resumed_at in (4, 5) and f"at step {resumed.result.resumed_at}/10" in err
    assert resumed.result.steps == CFG.steps
    assert resumed.result.losses == whole.result.losses
    assert _equal(resumed, whole)
    assert not _equal(whole, new_adapter(tiny, method, seed=CFG.seed)), "the adapter must have trained"


class Recording(Snapshot):
    """A snapshot that remembers the optimizer it was given, to look at it after the run."""

    def restore(self, params, opt, samplers, total_steps):
        self.optimizer = opt
        return super().restore(params, opt, samplers, total_steps)


@pytest.mark.parametrize("trainer", ["full", "fleet"])
def test_training_frees_the_optimizer_state_and_gradients_when_it_ends(tiny, tmp_path, trainer):
    """A torch optimizer sits in a reference cycle and the caller keeps the snapshot while it saves and scores the
    adapter: without an explicit release AdamW's state (8 bytes per trained parameter) and the last gradients stay
    in memory until a full garbage collection (at 0.5B full FT: +7.5 GB at the unit's end)."""
    snap = Recording(tmp_path / "run.snapshot.safetensors", KEY)
    if trainer == "full":
        adapters = [personalise(tiny, _tokens(1), "full", CFG, snapshot=snap)]
    else:
        adapters = list(train_fleet(tiny, {"a": _tokens(1), "b": _tokens(2)}, CFG, snapshot=snap).values())
    assert snap.optimizer.param_groups[0]["params"], "the optimizer was given the trained tensors"
    assert len(snap.optimizer.state) == 0
    assert all(p.grad is None for p in snap.optimizer.param_groups[0]["params"])
    assert all(p.grad is None for a in adapters for p in a.params.values())
    assert snap._opt is None and snap._params == []  # the snapshot lets go of the run once it has ended
    assert adapters[0].result.steps == CFG.steps


@pytest.mark.parametrize("method,periodic", [("norm", True), ("full", False)])
def test_full_fine_tuning_writes_its_snapshot_only_on_sigterm(tiny, tmp_path, monkeypatch, method, periodic):
    monkeypatch.setattr(snapshot_module, "EVERY_S", 0.0)  # a periodic snapshot would be due after every step
    path = tmp_path / f"{method}.snapshot.safetensors"
    personalise(tiny, _tokens(1), method, CFG, snapshot=for_method(method, path, KEY))
    assert path.is_file() == periodic
    path.unlink(missing_ok=True)
    stopping = for_method(method, path, KEY)  # the same snapshot, with a real SIGTERM after step 4
    after_step = stopping.after_step
    stopping.after_step = lambda step, *a: (step == 4 and os.kill(os.getpid(), signal.SIGTERM), after_step(step, *a))
    with pytest.raises(SystemExit):
        personalise(tiny, _tokens(1), method, CFG, snapshot=stopping)
    assert path.is_file() and json.loads(safe_open(str(path), "pt").metadata()["snapshot"])["step"] == 4


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


def test_a_fleet_pass_stopped_by_sigterm_resumes_to_the_uninterrupted_adapters(tiny, tmp_path, capsys):
    users = {f"u{i}": _tokens(10 + i) for i in range(2)}
    whole = train_fleet(tiny, users, CFG)
    path = tmp_path / "fleet.snapshot.safetensors"
    with pytest.raises(SystemExit):
        train_fleet(tiny, users, CFG, snapshot=StopAt(path, KEY, stop_at=6))
    capsys.readouterr()
    resumed = train_fleet(tiny, users, CFG, snapshot=Snapshot(path, KEY))
    assert "resuming from training snapshot" in capsys.readouterr().err
    for u in users:
        assert resumed[u].result.resumed_at in (6, 7)
        assert resumed[u].result.losses == whole[u].result.losses
        assert _equal(resumed[u], whole[u])


def test_the_bets_adapters_resume_and_leave_no_snapshot_behind(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(snapshot_module, "EVERY_S", 0.0)  # a snapshot after every step
    cfg, tokens = TrainConfig(steps=6, batch=2, seq=32, lr=1e-2), _tokens(3)
    spec = AdapterSpec("kind/alone", tokens, cfg)
    path = adapter_path(tiny, "kind/alone", "norm", cfg, "", tmp_path)
    with pytest.raises(SystemExit):
        personalise(tiny, tokens, "norm", cfg, snapshot=StopAt(beside(path), snapshot_key(tiny, [spec], "norm",
                                                                                          "fp32"), stop_at=2))
    capsys.readouterr()
    one = ensure_adapter(tiny, "kind/alone", tokens, "norm", cfg, "", tmp_path)
    assert "resuming from training snapshot" in capsys.readouterr().err
    assert sidecar(one)["resumed_at_step"] in (2, 3)
    specs = [AdapterSpec(f"kind/u{i}", _tokens(20 + i), cfg) for i in range(2)]
    two = ensure_norm_adapters(tiny, specs, tmp_path)
    assert one.is_file() and all(p.is_file() for p in two)
    assert not list(tmp_path.rglob("*snapshot*")), "snapshots were written (every step) and must be gone"


def test_the_bets_snapshot_key_is_the_one_runs_in_flight_wrote():
    """Runs started on 6128ca0 keep snapshots with this key; a later version must still resume them."""
    class FakeBase:
        fingerprint = "f" * 64
    tokens = torch.arange(10)
    key = snapshot_key(FakeBase(), [AdapterSpec("kind/u", tokens, TrainConfig(steps=5))], "lora", "bf16")
    assert key == {"base": "f" * 64, "method": "lora", "dtype": "bf16", "adapters": [{
        "user": "kind/u", "tag": "", "train": TrainConfig(steps=5).to_json(),
        "tokens": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}]}


def test_a_snapshot_with_a_bad_tensor_is_ignored_and_changes_nothing(tiny, tmp_path, capsys):
    tokens = _tokens(4)
    path = tmp_path / "run.snapshot.safetensors"
    with pytest.raises(SystemExit):
        personalise(tiny, tokens, "norm", CFG, snapshot=StopAt(path, KEY, stop_at=3))
    tensors = load_file(str(path))
    meta = safe_open(str(path), framework="pt").metadata()
    name = next(k for k in tensors if k.endswith("/exp_avg"))
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(path), metadata=meta)
    fresh = new_adapter(tiny, "norm", seed=CFG.seed)
    opt = torch.optim.AdamW(list(fresh.params.values()))
    before = {n: p.clone() for n, p in fresh.params.items()}
    done = Snapshot(path, KEY).restore(list(fresh.params.values()), opt, [iter([])], CFG.steps)
    assert done.step == 0 and "optimizer tensor" in capsys.readouterr().err
    assert all(torch.equal(before[n], p) for n, p in fresh.params.items()) and not opt.state_dict()["state"]


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
