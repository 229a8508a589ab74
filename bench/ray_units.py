"""The same quick bet sequential vs its units on a local Ray instance (2 one-CPU workers): wall-time ratio, Ray's
overhead per unit, and a bare Ray task's round trip.

    python bench/ray_units.py [--users 4] [--base tiny] [--workers 2]

Each run starts from empty out/ and result folders, so every unit trains and scores. Overhead per unit =
(workers x dispatch wall - sum of the units' own compute time) / units: worker start, imports, loading the base once
per worker, re-running the bet's run() to reach the unit, and moving the cells back.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sharedllm.bets import ray_units  # noqa: E402
from sharedllm.bets.harness import Options, get_bet, run_bet  # noqa: E402


def options(root: Path, users: list, base: str, ray: str | None) -> Options:
    return Options(quick=True, base=base, out=root / "out", results=root / "res", users=users, seeds=1,
                   ternary="none", ray=ray)


def bare_round_trip(n: int = 200) -> float:
    import ray

    @ray.remote(num_cpus=1)
    def noop(x):
        return x

    ray.get([noop.remote(i) for i in range(4)])  # workers up
    t = time.perf_counter()
    ray.get([noop.remote(i) for i in range(n)])
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    bet = get_bet("scale_protocol")
    users = sys.modules[bet.run.__module__].USERS[: args.users]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ray_units.start(None, num_cpus=args.workers)  # first: if Ray cannot start, nothing else is wasted
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        seq = run_bet(bet, options(Path(tmp) / "seq", users, args.base, None))
        seq_s = time.perf_counter() - t
        print(f"sequential: {seq_s:.1f} s", flush=True)
        t = time.perf_counter()
        par = run_bet(bet, options(Path(tmp) / "ray", users, args.base, "local"))
        ray_s = time.perf_counter() - t
        rt = bare_round_trip()
    n, units_s = par["meta"]["ray"]["units_computed"], par["meta"]["ray"]["unit_wall_s_sum"]
    out = {"base": args.base, "units": n, "workers": args.workers, "load_average": round(os.getloadavg()[0], 1),
           "sequential_s": round(seq_s, 1), "ray_init_s": round(init_s, 1), "ray_run_s": round(ray_s, 1),
           "speedup_incl_init": round(seq_s / (init_s + ray_s), 2), "speedup_excl_init": round(seq_s / ray_s, 2),
           "units_compute_s_sum": units_s,
           "overhead_per_unit_s": round((args.workers * ray_s - units_s) / n, 2),
           "bare_task_round_trip_ms": round(1000 * rt, 2), "same_verdict": seq["verdict"] == par["verdict"]}
    print(f"quick scale_protocol, {len(users)} users, {n} units, base {args.base}: sequential {seq_s:.1f} s; "
          f"Ray with {args.workers} workers {ray_s:.1f} s + {init_s:.1f} s to start Ray -> "
          f"{out['speedup_excl_init']}x ({out['speedup_incl_init']}x with start); overhead "
          f"{out['overhead_per_unit_s']} s per unit; bare Ray task round trip {out['bare_task_round_trip_ms']} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
