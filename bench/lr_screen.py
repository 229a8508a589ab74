"""A tiny learning-rate screen for one adapter method on one user's text: every lr one user of ONE fleet pass
(sharedllm.fleet: the same tokens under one name per lr, each with its own AdamW), then each adapter's held-out
token ppl (the text's last 20 %) vs the base's. A screening choice, not a tuned one: one user, one seed, few steps.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/lr_screen.py --method vera --lrs 1e-3,3e-3,1e-2,3e-2 \
        [--text data/corpora/novelist/carroll_alice_in_wonderland.txt] [--steps 40] [--batch 2] [--seq 128]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from sharedllm.base import load_base
    from sharedllm.data import split_by_position
    from sharedllm.fleet import train_fleet
    from sharedllm.personalise import evaluate_on
    from sharedllm.train import TrainConfig

    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True)
    p.add_argument("--lrs", required=True)
    p.add_argument("--base", default="default")
    p.add_argument("--text", default=str(ROOT / "data/corpora/novelist/carroll_alice_in_wonderland.txt"))
    p.add_argument("--chars", type=int, default=60_000, help="of the text, before the 80/20 split")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--out", default=None, help="write the JSON result here too")
    a = p.parse_args()
    torch.set_num_threads(1)
    base = load_base(a.base)
    train, held = split_by_position(Path(a.text).read_text(encoding="utf-8")[:a.chars])
    enc = lambda s: torch.tensor(base.tokenizer.encode(s), dtype=torch.long)  # noqa: E731
    train, held = enc(train), enc(held)
    lrs = [float(x) for x in a.lrs.split(",")]
    cfg = TrainConfig(steps=a.steps, batch=a.batch, seq=a.seq)
    cfgs = {f"lr{lr:g}": TrainConfig(steps=a.steps, batch=a.batch, seq=a.seq, lr=lr) for lr in lrs}
    t = time.perf_counter()
    fleet = train_fleet(base, {u: train for u in cfgs}, cfgs, method=a.method)
    wall = time.perf_counter() - t
    base_ppl = evaluate_on(base.model, base, held, 256, a.eval_tokens)["ppl"]
    rows = []
    for user, adapted in fleet.items():
        ppl = evaluate_on(adapted.model, base, held, 256, a.eval_tokens)["ppl"]
        rows.append({"lr": cfgs[user].lr, "heldout_ppl": ppl, "vs_base": ppl / base_ppl,
                     "first_loss": adapted.result.losses[0], "last5_loss": sum(adapted.result.losses[-5:]) / 5})
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["heldout_ppl"])
    result = {"method": a.method, "base": base.name, "text": Path(a.text).name, "chars": a.chars,
              "train_tokens": len(train), "heldout_tokens_scored": min(len(held) - 1, a.eval_tokens),
              "steps": a.steps, "batch": a.batch, "seq": a.seq, "base_heldout_ppl": base_ppl, "rows": rows,
              "best_lr": best["lr"], "train_wall_s": wall, "params": next(iter(fleet.values())).n_params}
    print(json.dumps(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
