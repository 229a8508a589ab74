"""What the in-context baseline costs to serve, beside a norm adapter, on the engine (no HTTP), side by side in one run.

adapter_frontier's in-context baseline shows the model the user's own most recent text (up to ~7.9k tokens at 135M)
before every request instead of an adapter. Here N chat senders each generate T greedy tokens after a 32-token prompt,
all submitted at once to one continuous-batching engine: (a) norm rows (each user's own gains; seeded perturbations:
the kernel's cost does not depend on the values) with the 32-token prompt alone; (b) base rows with the user's last
P tokens of chat text (data/corpora/chat) in front of the same prompt. Prints aggregate tok/s, time to first token
(median over users) and the ratios in-context / norm, and what each keeps per user: the adapter's bytes, or the
prefix's KV cache (fp32, the lean decoder's) if a server kept it instead of prefilling it on every request.

    PYTHONPATH=src python bench/incontext_cost.py [--base default] [--users 4] [--prefix 7935] [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sharedllm.adapters.rows import RowModel
from sharedllm.base import load_base
from sharedllm.data import load_user
from sharedllm.serve.scheduler import Engine, Job

from machine import describe
from rows_batched import prompts, states

CHAT = Path(__file__).resolve().parents[1] / "data" / "corpora" / "chat"


class FirstTokens:
    """The engine's metrics hook: seconds from submission to each row's first token."""

    def __init__(self):
        self.seconds = []

    def first_token(self, s: float) -> None:
        self.seconds.append(s)

    def __getattr__(self, name):
        return lambda *a, **k: None


def prefixes(base, n: int, length: int) -> list[list[int]]:
    """The last `length` training tokens of each of the first n chat senders (what the bet's baseline prefills)."""
    users = sorted(CHAT.glob("*.txt"))[:n]
    return [load_user(u, base.tokenizer).train[-length:].tolist() for u in users]


def generate(engine: Engine, rows: list, ps: list, tokens: int) -> float:
    start = time.perf_counter()
    with engine._cv:  # every job waits in the queue before the engine looks: one admission
        futs = [engine.submit(Job("generate", ps[i], rows[i], f"u{i}", tokens, 0.0, ignore_eos=True))
                for i in range(len(rows))]
    for f in futs:
        assert len(f.result(3600).ids) == tokens
    return time.perf_counter() - start


def kv_bytes(base, tokens: int) -> int:
    cfg = base.model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * tokens * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=7935, help="prefix tokens (the bet's at 135M: 8192 - 257)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.base)
    rm, timer = RowModel(base), FirstTokens()
    engine = Engine(rm, base.tokenizer.decode, eos_id=None, max_batch=16, max_rows_per_user=16, metrics=timer)
    short = prompts(base, args.users)
    long = [p + s for p, s in zip(prefixes(base, args.users, args.prefix), short)]
    print(f"{base.name}, {args.users} chat senders, {args.tokens} greedy tokens, prefix {args.prefix} tokens, "
          f"{args.threads} threads, decode {engine.stats()['decode']}; {describe()}")
    result = {}
    try:
        generate(engine, states(rm, base, "base", 2), short, 4)  # warm-up
        for kind, rows, ps in (("norm", states(rm, base, "norm", args.users), short),
                               ("incontext", states(rm, base, "base", args.users), long)):
            timer.seconds.clear()
            wall = generate(engine, rows, ps, args.tokens)
            result[kind] = {"tok_s": args.users * args.tokens / wall, "wall_s": wall,
                            "first_token_s": statistics.median(timer.seconds), "prompt_tokens": len(ps[0]),
                            "per_user_bytes": rows[0].nbytes if kind == "norm" else kv_bytes(base, args.prefix)}
            r = result[kind]
            print(f"{kind:9s} {r['tok_s']:7.2f} tok/s   first token {r['first_token_s']:7.2f} s (median)   "
                  f"prompt {r['prompt_tokens']:5d} tokens   per user {r['per_user_bytes'] / 1e6:8.2f} MB "
                  f"({'adapter, fp32 in memory' if kind == 'norm' else 'KV cache of the prefix, fp32, if kept'})")
    finally:
        engine.close()
    ic, norm = result["incontext"], result["norm"]
    print(f"in-context / norm: throughput {ic['tok_s'] / norm['tok_s']:.3f}x, first token "
          f"{ic['first_token_s'] / norm['first_token_s']:.1f}x later, per-user state "
          f"{ic['per_user_bytes'] / norm['per_user_bytes']:.0f}x")
    text = prefix_text_bytes(base, args.prefix)
    print(f"the prefix as text: {statistics.median(text):,.0f} B per user (median over the 12 senders)")
    print(json.dumps({"base": base.name, "users": args.users, "tokens": args.tokens, "prefix": args.prefix,
                      "threads": args.threads, "machine": describe(), "result": result,
                      "prefix_text_bytes": {"median": statistics.median(text), "min": min(text), "max": max(text)}}))


def prefix_text_bytes(base, length: int) -> list[int]:
    """What a server would store per user instead of an adapter: the prefix as UTF-8 text, for every chat sender."""
    return [len(base.tokenizer.decode(p).encode("utf-8")) for p in prefixes(base, 12, length)]


if __name__ == "__main__":
    main()
