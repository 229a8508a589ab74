"""Fairness and cancellation through a real `sharedllm serve` subprocess on loopback.

    python bench/serve_fairness.py [--base tiny] [--flood 32] [--max-tokens 1000] [--scores 40]

1. The victim (user bob) sends `--scores` score requests one after another, alone: p50 / p99 latency.
2. User ann floods: `--flood` greedy completions of `--max-tokens` each, sent on raw sockets that stay open.
   Once all are decoding, bob sends the same scores again: p50 / p99 under the flood, and the ratio.
3. Every flood socket is closed at once; /health is polled until no row is generating: how many decode steps
   ran after the disconnect and how many flood rows were still computing 1 s later.
   Also the server's own count: the most decode steps any row ran after its cancellation (`cancel_lag_steps_max`).
Targets: victim p99 under flood <= 3x unflooded p99; flood rows stop within one decode step of their client's
close (the engine polls every row's socket before each step; see `sharedllm.serve.hangup`). The 32 closes are
sent one after another, so a step boundary can fall between the first and the last: "steps after disconnect"
counts from the first close to the last row gone, and from the /health read just before the closes, so it also
counts any step that ran while that read's answer was on its way back (`before_read_s`): an upper bound.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sharedllm.serve import wait_until_healthy

ADMIN = "fairness-admin-token-0123456789abcdefghij"
TEXT = "the cat sat on the mat and then ran away from the quick brown dog"


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def latencies(c: httpx.Client, token: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = c.post("/v1/score", json={"text": TEXT, "adapter": "none"}, headers=auth(token))
        assert r.status_code == 200, r.text
        out.append(time.perf_counter() - t)
    return out


def p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def flood(port: int, token: str, n: int, max_tokens: int) -> list[socket.socket]:
    body = json.dumps({"prompt": "the", "max_tokens": max_tokens, "temperature": 0, "adapter": "none"}).encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        socks.append(s)
    return socks


def health(c: httpx.Client) -> dict:
    return c.get("/health").json()


def wait(cond, timeout=300.0, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def run(args) -> dict:
    d = Path(tempfile.mkdtemp())
    port = int(args.port)
    env = {**os.environ, "SHAREDLLM_ADMIN_TOKEN": ADMIN}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sharedllm.cli", "serve", "--base", args.base, "--store",
                             str(d / "store"), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_until_healthy(f"http://127.0.0.1:{port}", proc, 300), "server did not start"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            tok = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"]
                   for u in ("ann", "bob")}
            latencies(c, tok["bob"], 5)  # warm up
            alone = latencies(c, tok["bob"], args.scores)
            socks = flood(port, tok["ann"], args.flood, args.max_tokens)
            # every flood request is in the engine: decoding (at most --max-batch rows, 16 by default) or queued
            assert wait(lambda: (lambda h: h["generating_rows"] and h["generating_rows"] + h["queued"] == args.flood)(
                health(c))), health(c)
            flooded = latencies(c, tok["bob"], args.scores)
            tb = time.perf_counter()
            before = health(c)
            t0 = time.perf_counter()
            for s in socks:
                s.close()
            wait(lambda: (lambda h: h["generating_rows"] + h["queued"] == 0)(health(c)))
            stopped_s = time.perf_counter() - t0
            after = health(c)
            time.sleep(1.0)
            later = health(c)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    step_s = stopped_s / max(1, after["decode_steps"] - before["decode_steps"])
    return {"alone_p50": statistics.median(alone), "alone_p99": p(alone, 0.99),
            "flood_p50": statistics.median(flooded), "flood_p99": p(flooded, 0.99),
            "p99_ratio": p(flooded, 0.99) / p(alone, 0.99),
            "flood_rows_before_disconnect": before["generating_rows"], "flood_queued_before_disconnect": before["queued"],
            "decode_steps_after_disconnect": after["decode_steps"] - before["decode_steps"],
            "stop_s": stopped_s, "mean_step_s": step_s, "before_read_s": t0 - tb,
            "flood_rows_computing_1s_later": later["generating_rows"] + later["queued"], "cancelled_rows": later["cancelled_rows"],
            "cancel_lag_steps_max": later.get("cancel_lag_steps_max"),
            "steps_during_flood": before["decode_steps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--flood", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--scores", type=int, default=40)
    ap.add_argument("--port", default="8765")
    r = run(ap.parse_args())
    print("| victim p50 alone | p99 alone | p50 flooded | p99 flooded | p99 ratio (target <= 3) |\n|---|---|---|---|---|")
    print(f"| {r['alone_p50']:.4f} s | {r['alone_p99']:.4f} s | {r['flood_p50']:.4f} s | {r['flood_p99']:.4f} s | "
          f"**{r['p99_ratio']:.2f}** |")
    print("\n| flood rows at disconnect | decode steps after disconnect | time to stop | rows computing 1 s later "
          "| cancelled rows | max steps a row ran after its cancel |\n|---|---|---|---|---|---|")
    print(f"| {r['flood_rows_before_disconnect']} | {r['decode_steps_after_disconnect']} | {r['stop_s']:.3f} s | "
          f"{r['flood_rows_computing_1s_later']} | {r['cancelled_rows']} | {r['cancel_lag_steps_max']} |")
    print(json.dumps(r), file=sys.stderr)
    return 0 if r["p99_ratio"] <= 3 and r["flood_rows_computing_1s_later"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
