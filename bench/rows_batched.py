"""Per-row adapters in one batch vs one at a time, on the engine (no HTTP), side by side in one run.

For each kind of row (base-only, then every method with a per-row kernel: norm, LoRA-r4 on all seven projections,
(IA)^3, VeRA, LoRA-XS, RoAd, each at its default config), N users each with their own adapter
(seeded perturbations of a fresh adapter: the kernel's cost does not depend on the values) generate T greedy
tokens from 32-token prompts: all N submitted at once to one continuous-batching engine, then the same N one
after another. Prints aggregate tok/s for each and the ratios (batched / one at a time; each method / norm and /
base),
and the cost of building a batch's per-row views (once per batch composition) next to one decode step.

    PYTHONPATH=src python bench/rows_batched.py --base qwen2.5-coder-0.5b --users 8 --tokens 32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sharedllm.adapters.rows import RowModel
from sharedllm.base import load_base
from sharedllm.personalise import new_adapter
from sharedllm.serve.scheduler import Engine, Job

from machine import describe


def kinds() -> list:
    """base, then every registered method that runs per row (Capabilities.rows)."""
    from sharedllm.adapters import METHODS

    found = [name for name, m in METHODS.items() if m.caps.rows is not None]
    return ["base"] + sorted(found, key=lambda name: (name != "norm", name != "lora", name))


def states(rm: RowModel, base, kind: str, n: int) -> list:
    if kind == "base":
        return [rm.base_row] * n
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(n):
        adapted = new_adapter(base, kind, seed=s)
        noise = 0.02 if kind == "lora" else 0.05
        named = {k: p.detach() + noise * torch.randn(p.shape, generator=g) for k, p in adapted.params.items()}
        out.append(rm.row(named, kind, adapted.config))
    return out


def prompts(base, n: int) -> list[list[int]]:
    text = "def parse(text):\n    return [line.split() for line in text.splitlines() if line] # the parser " * 4
    ids = base.tokenizer.encode(text)
    return [ids[i: i + 32] for i in range(n)]


def run(engine: Engine, rows: list, ps: list, tokens: int, together: bool) -> float:
    """Seconds to generate `tokens` for every row, all submitted at once or one after another."""
    jobs = lambda i: Job("generate", ps[i], rows[i], f"u{i}", tokens, 0.0)  # noqa: E731
    start = time.perf_counter()
    if together:
        with engine._cv:  # every job waits in the queue before the engine looks: one admission
            futs = [engine.submit(jobs(i)) for i in range(len(rows))]
        for f in futs:
            assert len(f.result(3600).ids) == tokens
    else:
        for i in range(len(rows)):
            assert len(engine.submit(jobs(i)).result(3600).ids) == tokens
    return time.perf_counter() - start


def build_ms(rm: RowModel, rows: list, repeat: int = 5) -> float:
    with torch.inference_mode():
        rm.batch(rows)  # the first build allocates the gather buffer
        start = time.perf_counter()
        for _ in range(repeat):
            rm.batch(rows)
    return 1e3 * (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default=None, help="comma-separated (default: base and every per-row method)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.base)
    rm = RowModel(base)
    engine = Engine(rm, base.tokenizer.decode, eos_id=None, max_batch=max(16, args.users),
                    max_rows_per_user=max(16, args.users))
    ps = prompts(base, args.users)
    print(f"{base.name}, {args.users} users, 32-token prompts, {args.tokens} greedy tokens, {args.threads} threads, "
          f"decode {engine.stats()['decode']}; {describe()}")
    result = {}
    try:
        run(engine, states(rm, base, "base", 2), ps, 4, True)  # warm-up
        for kind in args.kinds.split(",") if args.kinds else kinds():
            rows = states(rm, base, kind, args.users)
            together = run(engine, rows, ps, args.tokens, True)
            alone = run(engine, rows, ps, args.tokens, False)
            n = args.users * args.tokens
            result[kind] = {"batched_tok_s": n / together, "alone_tok_s": n / alone, "ratio": alone / together,
                            "batch_build_ms": build_ms(rm, rows),
                            "mb_per_user": rows[0].nbytes / 1e6}
            r = result[kind]
            print(f"{kind:6s} batched {r['batched_tok_s']:7.2f} tok/s   one at a time {r['alone_tok_s']:7.2f} tok/s"
                  f"   batched / alone {r['ratio']:5.2f}x   view build {r['batch_build_ms']:7.1f} ms"
                  f"   {r['mb_per_user']:.2f} MB/user (fp32)")
    finally:
        engine.close()
    for b in ("norm", "base"):
        for a in (k for k in result if k not in (b, "base")):
            if b in result:
                print(f"{a} / {b} batched throughput: {result[a]['batched_tok_s'] / result[b]['batched_tok_s']:.2f}x")
    print(json.dumps({"base": base.name, "users": args.users, "tokens": args.tokens, "threads": args.threads,
                      "machine": describe(), "result": result}))


if __name__ == "__main__":
    main()
