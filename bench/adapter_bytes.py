"""Adapter bytes per scheme and the per-user policy, side by side in one run: for each of three users, train a
norm adapter briefly on the base, then score no adapter / raw fp16 / int8 / int8-channel / int8-delta on the user's
held-out 20 % and record what the policy ships.

    OMP_NUM_THREADS=1 nice python bench/adapter_bytes.py [--base default|FILE] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sharedllm.base import load_base
from sharedllm.data import load_user
from sharedllm.personalise import load_adapted, personalise, save_adapted
from sharedllm.quant.compress import policy_for
from sharedllm.quant.policy import table
from sharedllm.train import TrainConfig

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
USERS = {"programmer": "programmer/cpython_asyncio.txt", "novelist": "novelist/austen_pride_and_prejudice.txt",
         "scientist": "scientist/arxiv_astro_ph.txt"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="default")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--out", default="out/adapter_bytes.json")
    args = ap.parse_args()
    base = load_base(args.base)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for user, rel in USERS.items():
            data = load_user(CORPORA / rel, base.tokenizer)
            adapted = personalise(base, data.train, "norm", TrainConfig(steps=args.steps), label=user)
            path = save_adapted(adapted, Path(d) / f"{user}.safetensors", base)
            raw = load_adapted(base, path)
            rows[user] = policy_for(base, raw, data.heldout, 256, args.eval_tokens, source=user)
            print(f"== {user} ({args.steps} steps, {rows[user]['eval_tokens']} held-out tokens)\n"
                  f"{table(rows[user])}\n", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"base": base.name, "steps": args.steps, "users": rows}, indent=1))


if __name__ == "__main__":
    main()
