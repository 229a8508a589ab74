"""Memory at the end of a full fine-tuning unit: freeing the optimizer when training ends vs not.

A bet's full-FT unit trains (sharedllm.bets.common.ensure_adapter), saves the adapter, and loads it back to score it.
A torch optimizer sits in a reference cycle, so without `sharedllm.train.release_optimizer` AdamW's state (8 bytes
per parameter) and the last gradients (4 bytes) stay alive until a full garbage collection, i.e. while the adapter
is saved and loaded (at 0.5B the driver's peak was 21.7 GiB there, against 16.1 GiB while training).

Each arm runs in its own process on the same base, user text and steps: "kept" with release_optimizer made a no-op
(the code before the fix), "freed" as shipped. Per arm: the process's RSS when training returns (before the save),
the peak RSS of the save + load that follow (VmHWM reset through /proc/self/clear_refs when training returns), and
the peak of the training itself. Prints the ratio kept / freed of each.

    PYTHONPATH=src python bench/full_ft_memory.py [--base default] [--steps 3] [--user programmer/cpython_asyncio]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_info, status_bytes

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def arm(base_name: str, user: str, steps: int, free: bool) -> dict:
    import torch

    import sharedllm.train
    from sharedllm.base import load_base
    from sharedllm.bets import common
    from sharedllm.data import split_by_position
    from sharedllm.personalise import load_adapted

    if not free:
        sharedllm.train.release_optimizer = lambda opt: None
    base = load_base(base_name)
    train, _ = split_by_position((ROOT / "data" / "corpora" / f"{user}.txt").read_text(encoding="utf-8"))
    tokens = torch.tensor(base.tokenizer.encode(train[:200_000]), dtype=torch.long)
    out = {}
    save = common._save

    def measured_save(*args, **kwargs):  # called by ensure_adapter right after training returns
        out["train_peak"] = status_bytes("VmHWM")
        out["held_after_training"] = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: from here on, the save + load's peak
        return save(*args, **kwargs)

    common._save = measured_save
    cfg = sharedllm.train.TrainConfig(steps=steps, batch=2, seq=256, lr=5e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = common.ensure_adapter(base, user, tokens, "full", cfg, "", Path(tmp))
        loaded = load_adapted(base, path)  # what the scoring unit does next; alive while the peak is read
        out["save_load_peak"] = status_bytes("VmHWM")
        del loaded
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--user", default="programmer/cpython_asyncio")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--arm", choices=["kept", "freed"], help=argparse.SUPPRESS)  # one arm, in a subprocess
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(arm(a.base, a.user, a.steps, a.arm == "freed")))
        return
    res = {}
    for name in ("kept", "freed"):
        run = subprocess.run([sys.executable, __file__, "--base", a.base, "--user", a.user, "--steps", str(a.steps),
                              "--arm", name], capture_output=True, text=True, check=True)
        res[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"# full FT unit end, base {a.base}, {a.steps} steps of 2 x 256, {cpu_info()}")
    print(f"{'GiB':<34}{'kept':>8}{'freed':>8}{'kept/freed':>12}")
    for key, label in (("train_peak", "peak while training"), ("held_after_training", "held when training returns"),
                       ("save_load_peak", "peak of the save + load after it")):
        k, f = res["kept"][key] / GIB, res["freed"][key] / GIB
        print(f"{label:<34}{k:>8.2f}{f:>8.2f}{k / f:>12.2f}")


if __name__ == "__main__":
    main()
