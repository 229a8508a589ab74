"""fp32 vs bf16 compute on this CPU, side by side in one run: a decoder-sized matmul, a base's forward over
held-out text (fp32, bf16 autocast as `sharedllm bet --dtype bf16` uses it, the same with torch's bf16 GEMMs
replaced by fp32 ones on the same bf16 operands (`sharedllm.train.Bf16MatmulsInFp32`, what CPUs without native bf16
get), bf16 weights), with the ppl each gives; and a norm training step in fp32, bf16 native and bf16 emulated.

    OMP_NUM_THREADS=1 python bench/bf16_compute.py --base qwen2.5-coder-0.5b --tokens 1024

Prints time ratios against fp32 (the machine may be loaded: compare within one run) and the ppl shift."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from machine import describe  # noqa: E402

from sharedllm.base import load_base  # noqa: E402
from sharedllm.personalise import personalise  # noqa: E402
from sharedllm.train import Bf16MatmulsInFp32, TrainConfig, bf16_matmuls  # noqa: E402


def train_step_cpu_s(base, tokens, dtype: str, matmuls: str, steps: int) -> float:
    """CPU seconds per norm training step (2 x 256) in `dtype`, bf16 GEMMs `matmuls` (native or emulated)."""
    cfg = TrainConfig(steps=steps, batch=2, seq=256, lr=1e-3)
    with mock.patch.dict(os.environ, {"SHAREDLLM_BF16_MATMULS": matmuls}):
        t = time.process_time()
        personalise(base, tokens, "norm", cfg, dtype=dtype)
        return (time.process_time() - t) / steps


def matmul_gflops(dtype, m=512, k=896, n=4864, reps=20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def forward(model, ids, autocast: bool, emulate: bool = False) -> tuple[float, float]:
    with (torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
          Bf16MatmulsInFp32() if emulate else contextlib.nullcontext()):
        model(ids[:1, :16])  # warm-up
        t = time.perf_counter()
        logits = model(ids).logits.float()
        wall = time.perf_counter() - t
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return wall, math.exp(-lp.mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--tokens", type=int, default=1024, help="scored tokens, in windows of 256")
    ap.add_argument("--train-steps", type=int, default=2, help="norm steps per training row (0: no training rows)")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "data/corpora/novelist/"
                                          "austen_pride_and_prejudice.txt"))
    args = ap.parse_args()
    print(f"# {describe()}; torch threads {torch.get_num_threads()}")
    f32, b16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"matmul 512x896x4864: fp32 {f32:.1f} GFLOP/s, bf16 {b16:.1f} GFLOP/s, ratio {b16 / f32:.2f}x")
    base = load_base(args.base)
    text = Path(args.text).read_text()
    ids = torch.tensor(base.tokenizer.encode(text[-len(text) // 5:])[: args.tokens]).view(-1, 256)
    model = base.model.eval()
    rows = [("fp32", *forward(model, ids, False)), ("bf16 autocast", *forward(model, ids, True))]
    rows.append(("bf16 autocast, GEMMs emulated in fp32", *forward(model, ids, True, emulate=True)))
    rows.append(("bf16 weights", *forward(model.to(torch.bfloat16), ids, False)))
    print(f"| {args.base}, {ids.numel()} tokens | forward s | speed vs fp32 | ppl | ppl vs fp32 |\n|---|---:|---:|---:|---:|")
    for name, wall, p in rows:
        print(f"| {name} | {wall:.2f} | {rows[0][1] / wall:.2f}x | {p:.3f} | {100 * (p / rows[0][2] - 1):+.2f} % |")
    if args.train_steps:
        train_rows(args, text)


def train_rows(args, text: str) -> None:
    base = load_base(args.base)  # a fresh copy: the forward rows left theirs in bf16
    tokens = torch.tensor(base.tokenizer.encode(text[: len(text) // 2]))
    print(f"\nthis machine's default for --dtype bf16: {bf16_matmuls()} bf16 matmuls")
    ref = train_step_cpu_s(base, tokens, "fp32", "native", args.train_steps)
    print(f"| norm step, {args.base}, 2 x 256 | CPU s/step | vs fp32 |\n|---|---:|---:|\n| fp32 | {ref:.2f} | 1.00x |")
    for matmuls in ("emulated", "native"):
        cpu = train_step_cpu_s(base, tokens, "bf16", matmuls, args.train_steps)
        print(f"| bf16, {matmuls} GEMMs | {cpu:.2f} | {ref / cpu:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
