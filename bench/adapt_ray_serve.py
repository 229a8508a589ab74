"""Issue 32's done-when, item 4: N users from a manifest personalised on a local Ray instance into the store of a
running `sharedllm serve`, which then serves every one of them.

    PYTHONPATH=src python bench/adapt_ray_serve.py --base tiny --users 20 --workers 2 --steps 3
    PYTHONPATH=src python bench/adapt_ray_serve.py --base default --users 20 --workers 2 --steps 5 --seq 128

Starts `sharedllm serve --store S` (empty store) first, then runs `sharedllm adapt --manifest M --out-dir D --ray
--store S` as the CLI runs it, then asks the running server, with each user's token from D/store_tokens.jsonl,
for GET /v1/users/USER/adapter (the sha256 of D/USER.safetensors) and /v1/score of the user's held-out text with
their adapter and with the bare base ("adapter": "none"); then runs the same adapt command again (everything is
skipped). Prints one JSON object: wall times, users/hour, per-user ppl through the server.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import CORPORA, ServerProcess, auth  # noqa: E402

KINDS = ("programmer", "novelist", "scientist", "heterogeneous", "chat")


def users(n: int) -> dict[str, Path]:
    """The first n corpora users, round-robin over the kinds (so 20 users are not 20 chat senders)."""
    by_kind = {k: sorted((CORPORA / k).glob("*.txt")) for k in KINDS}
    out, i = {}, 0
    while len(out) < n:
        kind = KINDS[i % len(KINDS)]
        files = by_kind[kind]
        if i // len(KINDS) < len(files):
            path = files[i // len(KINDS)]
            out[path.stem.replace("_", "-")[:64]] = path
        i += 1
        if i > 10 * n + 100:
            raise SystemExit(f"only {len(out)} users in {CORPORA}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapt(args, work: Path, manifest: Path, store: Path, tag: str) -> tuple[float, dict, list]:
    progress = work / f"progress-{tag}.jsonl"
    cmd = [sys.executable, "-m", "sharedllm.cli", "adapt", "--manifest", str(manifest), "--out-dir", str(work / "D"),
           "--ray", "--ray-workers", str(args.workers), "--store", str(store), "--base", args.base,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--window", str(args.window),
           "--eval-tokens", str(args.eval_tokens), "--fleet-size", str(args.fleet_size), "--json",
           "--json-progress", str(progress)]
    t = time.perf_counter()
    with open(work / f"adapt-{tag}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise SystemExit(f"adapt exited {proc.returncode}; see {work / f'adapt-{tag}.log'}")
    return wall, json.loads(proc.stdout), [json.loads(x) for x in progress.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="tiny")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--fleet-size", type=int, default=2)
    p.add_argument("--score-bytes", type=int, default=800,
                   help="UTF-8 bytes of held-out text scored per user (the tiny base's context is 1,024 bytes)")
    p.add_argument("--work", default=None, help="folder for the manifest, D, the store and logs (default: a temp dir)")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="adapt-ray-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    chosen = users(args.users)
    manifest = work / "users.json"
    manifest.write_text(json.dumps({u: str(path) for u, path in chosen.items()}, indent=1))
    store = work / "store"
    load = os.getloadavg()
    with ServerProcess(args.base, store, free_port(), log=work / "server.log") as server:
        wall, r, events = adapt(args, work, manifest, store, "first")
        start = next(e for e in events if e["event"] == "start")
        trained_s = events[-1]["t"] - start["t"]  # from the first task sent to the last user settled
        tokens = {}
        for line in (work / "D" / "store_tokens.jsonl").read_text().splitlines():
            d = json.loads(line)
            tokens[d["user"]] = d["token"]
        served = []
        with httpx.Client(base_url=server.url, timeout=600) as c:
            for u, path in chosen.items():
                row = {"user": u, "status": next(x["status"] for x in r["users"] if x["user"] == u)}
                if row["status"] == "trained":
                    rec = c.get(f"/v1/users/{u}/adapter", headers=auth(tokens[u])).json()
                    file_sha = hashlib.sha256((work / "D" / f"{u}.safetensors").read_bytes()).hexdigest()
                    text = path.read_text(encoding="utf-8")
                    held = text[int(len(text) * 0.8):].encode()[: args.score_bytes].decode("utf-8", "ignore")
                    own = c.post("/v1/score", json={"text": held}, headers=auth(tokens[u]))
                    bare = c.post("/v1/score", json={"text": held, "adapter": "none"}, headers=auth(tokens[u]))
                    if own.status_code != 200 or bare.status_code != 200:
                        raise SystemExit(f"/v1/score for {u}: {own.status_code} {own.text[:200]}")
                    own, bare = own.json(), bare.json()
                    row.update(sha_matches=rec.get("sha256") == file_sha, ppl_own=own["ppl"], ppl_base=bare["ppl"],
                               change_pct=round(100 * (own["ppl"] / bare["ppl"] - 1), 3))
                served.append(row)
        health = httpx.get(f"{server.url}/health").json()
        again_wall, again, _ = adapt(args, work, manifest, store, "again")
    ok = [s for s in served if s.get("sha_matches")]
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs "
        f"(affinity {len(os.sched_getaffinity(0))}), load average {load[0]:.1f} at start",
        "base": args.base, "users": args.users, "workers": args.workers, "steps": args.steps, "batch": args.batch,
        "seq": args.seq, "fleet_size": args.fleet_size, "work": str(work),
        "adapt_wall_s": round(wall, 1), "ray_start_and_plan_s": round(start["t"], 1),
        "training_s": round(trained_s, 1), "users_per_hour_wall": round(3600 * r["trained"] / wall, 1),
        "users_per_hour_training": round(3600 * r["trained"] / trained_s, 1) if trained_s > 0 else None,
        "trained": r["trained"], "failed": r["failed"], "store_writes": r["store_writes"],
        "server_adapters": health["adapters"], "served_with_matching_sha": len(ok),
        "own_below_base": sum(s["ppl_own"] < s["ppl_base"] for s in ok),
        "median_change_pct": sorted(s["change_pct"] for s in ok)[len(ok) // 2] if ok else None,
        "rerun": {"wall_s": round(again_wall, 1), "skipped": again["skipped"], "trained": again["trained"],
                  "store_writes": again["store_writes"]},
        "task_cpu_s": sorted({(u.get("task_cpu_s"), u.get("fleet")) for u in r["users"] if u.get("task_cpu_s")}),
        "served": served,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
