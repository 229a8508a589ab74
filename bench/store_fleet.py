"""Fleet-scale adapter store: 215,000 synthetic users' norm adapters for the tiny base.

Imports every user (real adapter files in the wire format, one fsync per file, one SQLite transaction per
chunk), then measures: index size, disk use, metadata lookup latency (p50/p99 over random users), store open
time (with and without the crash sweep, which lists every file), and cold-load latency (read + validate exactly
as an upload is validated + decode to gains) with an empty LRU. Extrapolates disk use to the default base,
whose norm adapter is 35,136 fp16 gains.

    PYTHONPATH=src python bench/store_fleet.py [--users 215000] [--store DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sharedllm import wire
from sharedllm.base import load_base
from sharedllm.serve.router import Router
from sharedllm.store import AdapterStore

from serve_common import MACHINE

DEFAULT_BASE_GAINS = 35_136


def synthetic(router: Router, i: int) -> tuple[bytes, dict]:
    base_flat = torch.cat([v.reshape(-1) for v in router.model.base_gains])
    g = torch.Generator().manual_seed(i)
    flat = (base_flat * (1 + 0.05 * torch.randn(base_flat.shape, generator=g))).half()
    meta = {"format": wire.FORMAT, "format_version": wire.FORMAT_VERSION, "method": "norm", "scheme": "float16",
            "params": flat.numel(), "base_fingerprint": router.base.fingerprint,
            "layout": wire.layout_hash(router.layout), "shapes": [list(s) for _, s in router.layout]}
    return wire.adapter_bytes({"adapter": flat}, meta), meta


def pct(xs, q) -> float:
    return float(np.percentile(np.array(xs) * 1e3, q))


def du(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=215_000)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--store", default=None, help="folder (default: a temp folder, removed at the end)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.store or tempfile.mkdtemp(prefix="fleet-"))
    base = load_base("tiny")
    store = AdapterStore(root)
    router = Router(base, store)
    one, _ = synthetic(router, 0)
    t0 = time.perf_counter()
    for start in range(0, args.users, args.chunk):
        items = [(f"user{i:06d}", *synthetic(router, i)) for i in range(start, min(start + args.chunk, args.users))]
        store.put_many(items)
        done = start + len(items)
        print(f"{done} users, {done / (time.perf_counter() - t0):.0f}/s", flush=True)
    import_s = time.perf_counter() - t0
    rng = random.Random(0)
    users = [f"user{rng.randrange(args.users):06d}" for _ in range(args.samples)]
    lookups = []
    for u in users:
        t = time.perf_counter()
        assert store.get(u) is not None
        lookups.append(time.perf_counter() - t)
    cold = []
    for u in users[: args.samples // 2]:
        t = time.perf_counter()
        router.row_for(u)  # empty LRU for these: read file, sha256 check, validate, decode
        cold.append(time.perf_counter() - t)
    warm = []
    for u in users[: args.samples // 2]:
        t = time.perf_counter()
        router.row_for(u)
        warm.append(time.perf_counter() - t)
    router.close()
    store.close()
    t = time.perf_counter()
    AdapterStore(root, sweep=False).close()
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    s2 = AdapterStore(root)
    open_sweep_s, health = time.perf_counter() - t, s2.swept
    s2.close()
    index = sum(p.stat().st_size for p in root.glob("index.sqlite*"))
    files_disk = du(root / "adapters")
    per_default = len(one) - 320 * 2 + DEFAULT_BASE_GAINS * 2
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": MACHINE, "users": args.users, "base": "tiny",
        "adapter_file_bytes": len(one), "import_s": import_s, "import_per_s": args.users / import_s,
        "index_bytes": index, "index_bytes_per_user": index / args.users,
        "adapter_files_disk_bytes": files_disk,
        "lookup_ms_p50": pct(lookups, 50), "lookup_ms_p99": pct(lookups, 99),
        "cold_load_ms_p50": pct(cold, 50), "cold_load_ms_p99": pct(cold, 99),
        "cached_ms_p50": pct(warm, 50), "cached_ms_p99": pct(warm, 99),
        "open_s_no_sweep": open_s, "open_s_with_sweep": open_sweep_s,
        "sweep_found": {k: (len(v) if isinstance(v, list) else v) for k, v in health.items()},
        "default_base_adapter_bytes": per_default,
        "default_base_fleet_gb": per_default * args.users / 1e9,
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
