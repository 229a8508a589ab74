"""Peak memory (RSS) and time of one norm, LoRA-r4 and full training step at batch 2 x 256 on a base.

Each method runs in a fresh process (so its peak RSS is its own): load the base, attach the method as the trainer
does (a private copy of the base), time `--warmup` untimed then `--steps` timed AdamW steps with sharedllm's loss.
A method whose estimated memory exceeds what the machine has free is skipped and the estimate printed.

    PYTHONPATH=src python bench/base_steps.py --base qwen2.5-coder-0.5b [--methods norm,lora,full] [--steps 1]
        [--threads 1] [--dtype bf16]

--dtype bf16 runs the steps under the bets' autocast (what `sharedllm bet ... --dtype bf16` trains with);
bf16-frozen also holds the base's matmul weights in bf16 (`--frozen-bf16`: sharedllm.train.hold_frozen_in_bf16).
Several dtypes (`--dtype bf16,bf16-frozen`) run side by side and print each one's ratio to the first.
`private` = peak RSS minus the resident file-backed pages at the end (~ the process's own peak memory: the mapped
weights are shared by every process mapping the same file, e.g. two Ray workers). Each row
also gives the process CPU seconds per step: on a loaded machine (1 thread) that, not wall time, is the work done.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from machine import status_bytes

GIB = 1 << 30


def rss_gib() -> float:
    return status_bytes("VmRSS") / GIB


def rss_file_gib() -> float:
    """Resident file-backed pages: the base's weights, which transformers maps from the safetensors file (shared by
    every process that maps the same file)."""
    return status_bytes("RssFile") / GIB


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def one(base_spec: str, method: str, steps: int, warmup: int, threads: int, dtype: str = "fp32") -> dict:
    import torch

    from sharedllm.bets.common import autocast
    from sharedllm.train import hold_frozen_in_bf16

    if threads:
        torch.set_num_threads(threads)
    from sharedllm.adapters import adapted_model, get_method
    from sharedllm.base import load_base
    from sharedllm.losses import next_token_loss

    t = time.perf_counter()
    base = load_base(base_spec)
    if dtype == "bf16-frozen":
        hold_frozen_in_bf16(base.model)
    load_s, after_load = time.perf_counter() - t, rss_gib()
    model, params = adapted_model(base.model, get_method(method))
    opt = torch.optim.AdamW(list(params.values()), lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0)
    batch = torch.randint(0, base.model.config.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0))
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            t, cpu = time.perf_counter(), time.process_time()
        with autocast(dtype.removesuffix("-frozen")):
            loss = next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"method": method, "trainable": sum(p.numel() for p in params.values()), "load_s": round(load_s, 1),
            "rss_after_load_gib": round(after_load, 2), "step_s": round((time.perf_counter() - t) / steps, 2),
            "cpu_s_per_step": round((time.process_time() - cpu) / steps, 2), "dtype": dtype,
            "peak_rss_gib": round(peak_gib(), 2), "peak_private_gib": round(peak_gib() - rss_file_gib(), 2),
            "threads": torch.get_num_threads()}


def estimate_gib(params: int, method: str) -> float:
    """fp32 weights, before activations: norm / LoRA share the frozen base with their copy (1x); full fine-tuning
    holds the base, its own copy, gradients and two AdamW moments (5x)."""
    return params * 4 * (5 if method == "full" else 1) / GIB


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024 / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--methods", default="norm,lora,full")
    ap.add_argument("--steps", type=int, default=1, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine")
    ap.add_argument("--dtype", default="fp32",
                    help="compute dtypes, comma-separated: fp32, bf16 (autocast), bf16-frozen (autocast, matmul weights "
                         "held in bf16)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one method in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.base, args.one, args.steps, args.warmup, args.threads, args.dtype)))
        return
    from sharedllm.registry import resolve

    named = resolve(args.base)
    print(f"base {args.base}; {args.dtype}; batch 2 x 256; {args.warmup} warm-up + {args.steps} timed step(s); "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':6s} {'dtype':11s} {'trainable':>12s} {'load s':>7s} {'RSS load':>9s} {'s/step':>7s} {'CPU s':>6s} "
          f"{'peak RSS':>9s} {'private':>8s}")
    dtypes = args.dtype.split(",")
    for method in args.methods.split(","):
        need = estimate_gib(named.params, method) if named else 0.0
        if need > 0.9 * available_gib():
            print(f"{method:6s} skipped: needs ~{need:.0f} GiB (fp32 base + copy + grads + AdamW), "
                  f"{available_gib():.0f} GiB available")
            continue
        rows = [run_one(args, method, dtype) for dtype in dtypes]
        for r in rows[1:]:
            print(f"{method:6s} {r['dtype']} / {dtypes[0]}: CPU s per step {r['cpu_s_per_step'] / rows[0]['cpu_s_per_step']:.2f}x, "
                  f"peak RSS {r['peak_rss_gib'] / rows[0]['peak_rss_gib']:.2f}x, "
                  f"peak private {r['peak_private_gib'] / rows[0]['peak_private_gib']:.2f}x")


def run_one(args, method: str, dtype: str) -> dict:
    if dtype not in ("fp32", "bf16", "bf16-frozen"):
        raise SystemExit(f"--dtype {dtype!r}: fp32, bf16 or bf16-frozen")
    cmd = [sys.executable, __file__, "--base", args.base, "--one", method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--dtype", dtype]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(f"{method:6s} {dtype:11s} {r['trainable']:12,d} {r['load_s']:7.1f} {r['rss_after_load_gib']:8.2f}G "
          f"{r['step_s']:7.2f} {r['cpu_s_per_step']:6.1f} {r['peak_rss_gib']:8.2f}G {r['peak_private_gib']:7.2f}G   "
          f"{json.dumps(r)}", flush=True)
    return r

if __name__ == "__main__":
    main()
