"""Crash safety: kill -9 the real server in the middle of uploads, restart it, check every acknowledged adapter.

Each cycle: start `sharedllm serve` (tiny base), run --writers threads that keep uploading fresh adapters for
their users, SIGKILL the server after a random delay, inspect the store on disk (what the crash left), restart,
then verify through the server and on disk: for every user, the stored adapter is the last acknowledged upload or
an upload that was still in flight at the kill (never an older one, never a broken one); its file's sha256
matches its name; scoring with it works; and the store has no temp file, orphan file or row without a file.

    PYTHONPATH=src python bench/serve_fault.py [--cycles 5] [--writers 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx

from sharedllm.base import load_base
from sharedllm.store import AdapterStore

from serve_common import MACHINE, ServerProcess, adapter_files, auth, create_users


class Writer(threading.Thread):
    """Uploads adapters for one user until told to stop; remembers what was acknowledged and what was in flight."""

    def __init__(self, url, user, token, pool):
        super().__init__(daemon=True)
        self.url, self.user, self.token, self.pool = url, user, token, pool
        self.acked, self.in_flight, self.stop, self.errors = None, None, False, 0
        self.sent_after_ack: set[str] = set()

    def run(self):
        rng = random.Random(self.user)
        with httpx.Client(timeout=10) as c:
            while not self.stop:
                data = rng.choice(self.pool)
                sha = hashlib.sha256(data).hexdigest()
                self.in_flight = sha
                self.sent_after_ack.add(sha)
                try:
                    r = c.put(f"{self.url}/v1/users/{self.user}/adapter", content=data, headers=auth(self.token))
                except httpx.TransportError:
                    return  # the server died under us: this upload was never acknowledged
                if r.status_code == 200 and r.json()["sha256"] == sha:
                    self.acked, self.sent_after_ack = sha, set()
                else:
                    self.errors += 1


def cycle(server, store_dir, users, tokens, pool, rng) -> dict:
    server.start()
    writers = [Writer(server.url, u, tokens[u], pool) for u in users]
    [w.start() for w in writers]
    time.sleep(rng.uniform(1.0, 3.0))
    server.kill9()
    for w in writers:
        w.stop = True
        w.join(timeout=15)
    s = AdapterStore(store_dir, sweep=False)
    left = s.check()
    s.close()
    server.start()
    bad = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for w in writers:
            if w.acked is None and not w.sent_after_ack:
                continue
            r = c.get(f"/v1/users/{w.user}/adapter", headers=auth(w.token))
            sha = r.json().get("sha256") if r.status_code == 200 else None
            allowed = {w.acked} | w.sent_after_ack
            if sha not in allowed - {None}:
                bad.append(f"{w.user}: stored {sha}, acknowledged {w.acked}")
            elif c.post("/v1/score", json={"text": "after the crash"}, headers=auth(w.token)).status_code != 200:
                bad.append(f"{w.user}: scoring failed after restart")
    server.stop()
    s = AdapterStore(store_dir, sweep=False)
    after = s.check()
    for u in users:
        rec = s.get(u)
        if rec and hashlib.sha256(s.path_of(rec.sha256).read_bytes()).hexdigest() != rec.sha256:
            bad.append(f"{u}: file content does not match its sha256")
    s.close()
    return {"acked_uploads_at_kill": sum(w.acked is not None for w in writers),
            "in_flight_at_kill": sum(bool(w.sent_after_ack) for w in writers),
            "left_by_crash": {k: len(v) if isinstance(v, list) else v for k, v in left.items()},
            "after_restart": {k: len(v) if isinstance(v, list) else v for k, v in after.items()},
            "upload_errors": sum(w.errors for w in writers), "violations": bad}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-fault-"))
    base = load_base("tiny")
    pool = adapter_files(base, 32, work / "adapters", scale=0.2)
    server = ServerProcess("tiny", work / "store", args.port)
    server.start()
    users = [f"writer{i}" for i in range(args.writers)]
    tokens = create_users(server.url, users)
    server.stop()
    rng = random.Random(0)
    results = []
    for i in range(args.cycles):
        results.append(cycle(server, work / "store", users, tokens, pool, rng))
        print(f"cycle {i + 1}: {json.dumps(results[-1])}", flush=True)
    clean = [r["after_restart"] for r in results]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": MACHINE, "cycles": args.cycles,
              "writers": args.writers, "violations": sum(len(r["violations"]) for r in results),
              "crash_leftovers_total": {k: sum(r["left_by_crash"][k] for r in results)
                                        for k in ("temp_files", "orphan_files", "missing_files", "wrong_size")},
              "after_restart_total": {k: sum(c[k] for c in clean)
                                      for k in ("temp_files", "orphan_files", "missing_files", "wrong_size")},
              "in_flight_at_kill_total": sum(r["in_flight_at_kill"] for r in results)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
