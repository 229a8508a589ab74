"""Training-step speed on the default base, side by side in one run.

Times norm-only, LoRA-r4 and full fine-tuning steps at batch 2 x 256, a forward-only scoring pass, the machine's
measured fp32 matmul peak (a large torch.mm), and PEFT's own LNTuningConfig step on the same model and batch.
Prints achieved GFLOP/s, the fraction of measured peak and the ratio to PEFT.

    PYTHONPATH=src python bench/train_step.py [--base default] [--steps 3] [--warmup 1] [--rounds 3]

Rows are timed in interleaved rounds and the median kept: these machines are noisy.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from machine import describe
from sharedllm.adapters import adapted_model, get_method
from sharedllm.base import load_base
from sharedllm.losses import logits_loss as plain_loss, next_token_loss, next_token_nll


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def forward_flops(model, tokens: int, seq: int) -> float:
    """2 x (matmul weights) x tokens, plus attention scores and values (causal: half of 4 x L x T x seq x d)."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = 2 * cfg.num_hidden_layers * tokens * seq * cfg.hidden_size
    return 2 * linear * tokens + attn


CPU_S: list = []  # process CPU seconds per step of the last timing (1 thread on a shared machine: work done)


def time_steps(model, params, batch, steps: int, warmup: int, loss_fn) -> float:
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            t, c = time.perf_counter(), time.process_time()
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    CPU_S.append((time.process_time() - c) / steps)
    return (time.perf_counter() - t) / steps


@torch.no_grad()
def time_forward(model, batch, steps: int, score) -> float:
    model.eval()
    score(model, batch)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        score(model, batch)
    CPU_S.append((time.process_time() - c) / steps)
    return (time.perf_counter() - t) / steps


def peft_ln_tuning(base_model):
    from peft import LNTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base_model), LNTuningConfig(task_type="CAUSAL_LM"))
    return model, [p for p in model.parameters() if p.requires_grad]


def contenders(base, batch, steps: int, warmup: int) -> dict:
    """name -> (a function timing one round of `steps` steps, FLOP multiple of a forward pass).

    A norm-only step computes activation gradients but no weight gradients: ~2 x forward; full: ~3 x forward.
    sharedllm's rows use its trainer's loss (chunked head + cross-entropy, sharedllm.losses); the "(plain CE)" row
    and PEFT use full logits, so the table separates the loss's share from the rest of the step. "copied base"
    trains on a private deep copy of the base (what adapted_model did before 2026-11-30), the others share it."""
    rows = {}
    for name, mult, loss_fn in [("norm", 2.0, next_token_loss), ("norm (plain CE)", 2.0, plain_loss),
                                ("lora", 2.0, next_token_loss), ("full", 3.0, next_token_loss)]:
        model, params = adapted_model(base.model, get_method(name.split()[0]))
        rows[name] = (lambda m=model, p=list(params.values()), f=loss_fn: time_steps(m, p, batch, steps, warmup, f),
                      mult)
    model, params = adapted_model(copy.deepcopy(base.model), get_method("norm"))  # the pre-2026-11-30 layout
    rows["norm (plain CE) copied base"] = (
        lambda m=model, p=list(params.values()): time_steps(m, p, batch, steps, warmup, plain_loss), 2.0)
    model, params = peft_ln_tuning(base.model)
    rows["peft_ln_tuning"] = (lambda: time_steps(model, params, batch, steps, warmup, plain_loss), 2.0)
    rows["score (sharedllm)"] = (lambda: time_forward(base.model, batch, steps, next_token_nll), 1.0)
    rows["forward (logits)"] = (lambda: time_forward(base.model, batch, steps, plain_loss), 1.0)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all rows, interleaved; the median is kept")
    ap.add_argument("--rows", default="", help="comma-separated subset of rows (peft_ln_tuning is always kept)")
    args = ap.parse_args()
    base = load_base(args.base)
    batch = torch.randint(0, base.model.config.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0))
    tokens = 2 * 256
    fwd = forward_flops(base.model, tokens, 256)
    rows, peaks = contenders(base, batch, args.steps, args.warmup), []
    if args.rows:
        keep = set(args.rows.split(",")) | {"peft_ln_tuning"}
        rows = {k: v for k, v in rows.items() if k in keep}
    times: dict = {name: [] for name in rows}
    cpus: dict = {name: [] for name in rows}
    for _ in range(args.rounds):  # interleaved so that a noisy neighbour hits every row alike
        peaks.append(matmul_peak())
        for name, (timer, _mult) in rows.items():
            times[name].append(timer())
            cpus[name].append(CPU_S[-1])
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    report({n: (median(times[n]), rows[n][1], median(cpus[n])) for n in rows}, fwd, max(peaks), tokens, args)


def report(rows, fwd, peak, tokens, args) -> None:
    print(f"base {args.base}; batch 2 x 256; median of {args.rounds} interleaved rounds of {args.steps} timed steps "
          f"(after {args.warmup} warm-up); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(describe())
    print(f"measured fp32 matmul peak (2048^3 torch.mm, best of the rounds): {peak:.1f} GFLOP/s")
    print(f"{'what':28s} {'s/step':>8s} {'tok/s':>8s} {'GFLOP/s':>8s} {'of peak':>8s} {'vs PEFT LN':>10s} "
          f"{'CPU s/step':>10s} {'CPU vs PEFT':>11s}")
    peft_s, peft_cpu = rows["peft_ln_tuning"][0], rows["peft_ln_tuning"][2]
    out = {"peak_gflops": peak}
    for name, (sec, mult, cpu) in rows.items():
        gf = mult * fwd / sec / 1e9
        ratio = float("nan") if mult == 1.0 else peft_s / sec
        cpu_ratio = float("nan") if mult == 1.0 else peft_cpu / cpu
        print(f"{name:28s} {sec:8.3f} {tokens / sec:8.0f} {gf:8.1f} {gf / peak:8.2f} {ratio:10.2f} {cpu:10.3f} "
              f"{cpu_ratio:11.2f}")
        out[name] = {"s_per_step": sec, "gflops": gf, "fraction_of_peak": gf / peak, "speedup_vs_peft": ratio,
                     "cpu_s_per_step": cpu, "cpu_speedup_vs_peft": cpu_ratio}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
