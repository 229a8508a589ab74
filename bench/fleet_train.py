"""Users per hour: many norm adapters in one pass (sharedllm.fleet) vs one user at a time vs PEFT LN tuning.

Every contender runs in its own subprocess (so peak RSS is its own), on the same users' real texts
(data/corpora), batch 2 x 256 tokens per user per step. Each measures its setup (model copies, optimizer) and
--steps training steps; users/hour is extrapolated to --extrapolate steps per user (default 100, the trainer's
default): users / (setup + extrapolate x seconds per step). --steps is small because this machine is slow and
shared: the extrapolation assumes later steps cost what the measured ones did (the first step is included).
The largest fleet also trains --check of its users alone and reports the largest gain difference (exactness).
--dtype fp32,bf16 runs every contender in each compute dtype (bf16: torch.autocast; bf16-frozen: autocast with the
matmul weights held in bf16, as `sharedllm adapt --dtype bf16` trains norm adapters; the check then trains alone in
the same dtype); "vs alone" is against one user at a time in the first dtype given.

    PYTHONPATH=src python bench/fleet_train.py [--base default] [--users 1,2,4,8,16] [--steps 3] [--rounds 1]
                                               [--dtype fp32,bf16] [--no-peft]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_info, load_average

ROOT = Path(__file__).resolve().parents[1]
TEXT_CHARS = 60_000  # of each user's text: plenty of 257-token windows, quick to tokenize


def user_tokens(base, count: int) -> dict:
    """`count` users' training tokens from the repository's corpora (their first 80 %, capped)."""
    from sharedllm.data import split_by_position

    entries = json.loads((ROOT / "data" / "corpora" / "manifest.json").read_text())
    out = {}
    for e in entries[:count]:
        train, _ = split_by_position((ROOT / "data" / "corpora" / e["path"]).read_text(encoding="utf-8"))
        out[e["uid"]] = torch.tensor(base.tokenizer.encode(train[:TEXT_CHARS]), dtype=torch.long)
    if len(out) < count:
        raise SystemExit(f"only {len(out)} user corpora; asked for {count}")
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fleet(base, users: dict, cfg, check: int, dtype: str) -> dict:
    from sharedllm.fleet import train_fleet
    from sharedllm.personalise import personalise

    t, c = time.perf_counter(), time.process_time()
    adapted = train_fleet(base, users, cfg, dtype=dtype)
    out = _timing(len(users), next(iter(adapted.values())).result, t, c, cfg.steps)
    if check:
        names = list(users)[:: max(1, len(users) // check)][:check]
        diffs = []
        for u in names:
            alone = personalise(base, users[u], "norm", cfg, dtype=dtype)
            diffs.append(max((alone.params[n] - adapted[u].params[n]).abs().max().item() for n in alone.params))
        out["check_users"], out["max_gain_diff_vs_alone"] = len(names), max(diffs)
    return out


def run_alone(base, users: dict, cfg, dtype: str) -> dict:
    from sharedllm.personalise import personalise

    t, c = time.perf_counter(), time.process_time()
    adapted = personalise(base, next(iter(users.values())), "norm", cfg, dtype=dtype)
    return _timing(1, adapted.result, t, c, cfg.steps)


def _timing(users: int, result, t0: float, c0: float, steps: int) -> dict:
    """Setup and per-step seconds, wall and process CPU (1 thread on a shared machine: CPU = work done)."""
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"users": users, "setup_s": wall - result.wall_s, "step_s": result.wall_s / steps,
            "setup_cpu_s": cpu - result.cpu_s, "step_cpu_s": result.cpu_s / steps}


def run_peft(base, users: dict, cfg, dtype: str) -> dict:
    """PEFT LNTuningConfig, one adapter at a time: its documented recipe (a copy of the base, plain logits + CE)."""
    from peft import LNTuningConfig, get_peft_model

    from sharedllm.data import batch_sampler
    from sharedllm.losses import logits_loss
    from sharedllm.train import autocast

    t, c = time.perf_counter(), time.process_time()
    model = get_peft_model(copy.deepcopy(base.model), LNTuningConfig(task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas)
    batches = batch_sampler(next(iter(users.values())), cfg.batch, cfg.seq, cfg.seed)
    model.train()
    setup, setup_cpu, t, c = time.perf_counter() - t, time.process_time() - c, time.perf_counter(), time.process_time()
    for _ in range(cfg.steps):
        with autocast(dtype):
            loss = logits_loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"users": 1, "setup_s": setup, "step_s": (time.perf_counter() - t) / cfg.steps,
            "setup_cpu_s": setup_cpu, "step_cpu_s": (time.process_time() - c) / cfg.steps}


def child(args) -> None:
    """One contender in this process; prints one JSON line."""
    from sharedllm.base import load_base
    from sharedllm.train import TrainConfig

    base = load_base(args.base)
    dtype = args.child_dtype
    if dtype == "bf16-frozen":  # what `sharedllm adapt --dtype bf16` does for norm adapters
        from sharedllm.train import hold_frozen_in_bf16

        hold_frozen_in_bf16(base.model)
        dtype = "bf16"
    users = user_tokens(base, args.child_users)
    cfg = TrainConfig(steps=args.steps, batch=2, seq=256)
    before = rss_mb()
    if args.child == "fleet":
        r = run_fleet(base, users, cfg, args.check if args.child_users == max(args.user_counts) else 0, dtype)
    else:
        r = (run_alone if args.child == "alone" else run_peft)(base, users, cfg, dtype)
    r.update(dtype=args.child_dtype, rss_base_mb=before, rss_peak_mb=rss_mb(), load=load_average())
    print("RESULT " + json.dumps(r), flush=True)


def spawn(args, kind: str, users: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--base", args.base, "--steps", str(args.steps), "--users", args.users,
           "--check", str(args.check), "--child", kind, "--child-users", str(users), "--child-dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(line[len("RESULT "):])


def mem_available_mb() -> float:
    try:
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return float("inf")


def memory_guard(runs: dict, c: tuple) -> dict | None:
    """Skip a fleet that the U=1 fleet's memory growth says will not fit in 70 % of the available memory
    (this machine is shared: an OOM kill could hit someone else's job)."""
    one = [r for r in runs.get(("fleet", 1, c[2]), []) if "error" not in r]
    if c[0] != "fleet" or not one:
        return None
    need = (one[0]["rss_peak_mb"] - one[0]["rss_base_mb"]) * c[1]
    if need > 0.7 * mem_available_mb():
        return {"error": f"skipped: needs ~{need:.0f} MB, {mem_available_mb():.0f} MB available"}
    return None


def per_hour(r: dict, steps: int, clock: str = "") -> float:
    """Users per hour at `steps` steps per user, on the wall clock ("") or on CPU time ("cpu_")."""
    return 3600 * r["users"] / (r[f"setup_{clock}s"] + steps * r[f"step_{clock}s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--users", default="1,2,4,8,16", help="fleet sizes U (users per pass)")
    ap.add_argument("--steps", type=int, default=3, help="measured training steps per contender")
    ap.add_argument("--extrapolate", type=int, default=100, help="steps per user in the users/hour figure")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over all contenders, interleaved; median kept")
    ap.add_argument("--check", type=int, default=2, help="users of the largest fleet also trained alone")
    ap.add_argument("--dtype", default="fp32", help="compute dtypes, comma-separated (fp32, bf16, bf16-frozen: bf16 "
                                                     "with the matmul weights held in bf16, as `sharedllm adapt "
                                                     "--dtype bf16` trains norm adapters); the first is the "
                                                     "reference of 'vs alone'")
    ap.add_argument("--no-peft", action="store_true", help="leave PEFT LN tuning out (saves time on a slow machine)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--child-users", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.user_counts = [int(u) for u in args.users.split(",")]
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if set(args.dtypes) - {"fp32", "bf16", "bf16-frozen"} or not args.dtypes:
        ap.error(f"--dtype {args.dtype!r}: fp32, bf16, bf16-frozen (comma-separated)")
    if args.child:
        return child(args)
    # alone in every dtype first (the references), then the fleets, smallest first (each dtype in turn)
    contenders = [("alone", 1, d) for d in args.dtypes] + [("peft", 1, d) for d in args.dtypes if not args.no_peft]
    contenders += [("fleet", u, d) for u in args.user_counts for d in args.dtypes]
    runs: dict = {c: [] for c in contenders}
    for rnd in range(args.rounds):
        for c in contenders:
            runs[c].append(memory_guard(runs, c) or spawn(args, *c))
            print(f"round {rnd + 1}: {c[0]} U={c[1]} {c[2]}: {runs[c][-1]}", file=sys.stderr, flush=True)
    report(args, {c: _median(rs, args.extrapolate) for c, rs in runs.items()})


def _median(results: list, steps: int) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    ok.sort(key=lambda r: per_hour(r, steps))
    return ok[len(ok) // 2]


def _refs(alone: dict, steps: int) -> tuple[float, float]:
    """(users/hour wall, users/hour CPU) of one user at a time; NaN when that contender failed."""
    if "error" in alone:
        return float("nan"), float("nan")
    return per_hour(alone, steps), per_hour(alone, steps, "cpu_")


def report(args, med: dict) -> None:
    info = cpu_info()
    print(f"base {args.base}; 2 x 256 tokens per user per step; {args.steps} measured steps per contender, "
          f"users/hour extrapolated to {args.extrapolate} steps per user; median of {args.rounds} round(s)")
    print(f"CPU {info['model']} ({' '.join(info['isa'])}); torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average at the end {load_average()}")
    refs = {d: _refs(med.get(("alone", 1, d), {"error": "not run"}), args.extrapolate) for d in args.dtypes}
    ref, ref_cpu = refs[args.dtypes[0]]
    print(f"'vs alone': against one user at a time in {args.dtypes[0]}; 'CPU vs alone same dtype': in the row's dtype")
    print(f"{'what':33s} {'setup s':>8s} {'s/step':>8s} {'s/user-step':>11s} {'users/h':>8s} {'vs alone':>8s} "
          f"{'CPU s/user-step':>15s} {'CPU users/h':>11s} {'vs alone':>8s} {'same dtype':>10s} {'peak RSS MB':>11s} "
          f"{'max |dgain|':>11s}")
    out = {"cpu": info, "load_end": load_average(), "dtypes": args.dtypes, "rows": {}}
    for (kind, u, dtype), r in med.items():
        name = {"alone": "one at a time (sharedllm)", "peft": "PEFT LN tuning, 1 at a time"}.get(kind, f"fleet U={u}")
        name = f"{name} {dtype}"
        if "error" in r:
            print(f"{name:33s} {r['error']}")
            continue
        uph, cph = per_hour(r, args.extrapolate), per_hour(r, args.extrapolate, "cpu_")
        same_cpu = refs[dtype][1]
        diff = f"{r['max_gain_diff_vs_alone']:.1e}" if "max_gain_diff_vs_alone" in r else ""
        print(f"{name:33s} {r['setup_s']:8.2f} {r['step_s']:8.2f} {r['step_s'] / u:11.2f} {uph:8.1f} "
              f"{uph / ref:8.2f} {r['step_cpu_s'] / u:15.2f} {cph:11.1f} {cph / ref_cpu:8.2f} {cph / same_cpu:10.2f} "
              f"{r['rss_peak_mb']:11.0f} {diff:>11s}")
        out["rows"][name] = {**r, "users_per_hour": uph, "vs_alone": uph / ref, "cpu_users_per_hour": cph,
                             "cpu_vs_alone": cph / ref_cpu, "cpu_vs_alone_same_dtype": cph / same_cpu}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
