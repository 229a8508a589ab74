"""Fairness and cancellation through a real `sharedllm serve` subprocess on loopback.

    python bench/serve_fairness.py [--base tiny] [--flood 32] [--max-tokens 1000] [--scores 40] [--completions 40]
                                   [--flood-adapter none|lora] [--uncapped] [--server-args "..."]

1. The victim (user bob) sends `--scores` score requests one after another, alone, then `--completions` short
   completions (greedy, `--victim-tokens` 8 tokens, bare base): p50 / p99 latency of each.
2. User ann floods: `--flood` greedy completions of `--max-tokens` each, sent on raw sockets that stay open
   (with the bare base, or with her own LoRA adapter: `--flood-adapter lora`, a seeded one saved as the CLI saves).
   Once all are decoding or queued, bob sends the same scores and completions again: p50 / p99 under the flood, and
   the ratios. A completion needs a decode row: ann holds at most `--max-rows-per-user` of them (default half of
   `--max-batch`), so bob's is admitted at the next admission instead of waiting for one of her 1,000-token rows
   to end. `--uncapped` runs everything again on a server with `--max-rows-per-user` = `--max-batch` (one user may
   fill the batch: the behaviour before the cap), with at most 2 victim completions (each waits for a flood row
   to end).
3. Every flood socket is closed at once; /health is polled until no row is generating: how many decode steps
   ran after the disconnect and how many flood rows were still computing 1 s later.
   Also the server's own count: the most decode steps any row ran after its cancellation (`cancel_lag_steps_max`).
Targets: victim p99 under flood <= 3x unflooded p99 (scores and completions); flood rows stop within one decode
step of their client's close (the engine polls every row's socket before each step; see `sharedllm.serve.hangup`).
The 32 closes are sent one after another, so a step boundary can fall between the first and the last: "steps after disconnect"
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


def completion_latencies(c: httpx.Client, token: str, n: int, max_tokens: int,
                         steps: list | None = None) -> list[float]:
    """Latencies of n short completions one after another; `steps` gets the decode steps the server ran during each
    (from /health before and after, outside the timed part): what the victim waited in steps, not seconds."""
    out = []
    for _ in range(n):
        s0 = health(c)["decode_steps"] if steps is not None else 0
        t = time.perf_counter()
        r = c.post("/v1/completions", json={"prompt": TEXT[:20], "max_tokens": max_tokens, "temperature": 0,
                                            "adapter": "none"}, headers=auth(token))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens, r.text
        out.append(time.perf_counter() - t)
        if steps is not None:
            steps.append(health(c)["decode_steps"] - s0)
    return out


def lora_file(base_name: str, out: Path) -> bytes:
    """A LoRA adapter for the base whose A and B are seeded noise (so its rows differ from the base's)."""
    import torch

    from sharedllm.base import load_base
    from sharedllm.personalise import new_adapter, save_adapted

    base = load_base(base_name)
    adapted = new_adapter(base, "lora")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in adapted.params.values():
            q.add_(0.05 * torch.randn(q.shape, generator=g))
    save_adapted(adapted, out, base)
    return out.read_bytes()


def flood(port: int, token: str, n: int, max_tokens: int, adapter: str = "none") -> list[socket.socket]:
    body = json.dumps({"prompt": "the", "max_tokens": max_tokens, "temperature": 0, "adapter": adapter}).encode()
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


def run(args, extra: tuple[str, ...] = (), port: int | None = None, completions: int | None = None) -> dict:
    d = Path(tempfile.mkdtemp())
    port = int(port or args.port)
    completions = args.completions if completions is None else completions
    env = {**os.environ, "SHAREDLLM_ADMIN_TOKEN": ADMIN}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sharedllm.cli", "serve", "--base", args.base, "--store",
                             str(d / "store"), "--port", str(port), *args.server_args.split(), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_until_healthy(f"http://127.0.0.1:{port}", proc, 300), "server did not start"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            tok = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"]
                   for u in ("ann", "bob")}
            if args.flood_adapter == "lora":
                r = c.put("/v1/users/ann/adapter", content=lora_file(args.base, d / "ann-lora.safetensors"),
                          headers=auth(tok["ann"]))
                assert r.status_code == 200 and r.json()["method"] == "lora", r.text
            latencies(c, tok["bob"], 5)  # warm up
            completion_latencies(c, tok["bob"], 3, args.victim_tokens)
            alone = latencies(c, tok["bob"], args.scores)
            alone_c = completion_latencies(c, tok["bob"], completions, args.victim_tokens)
            socks = flood(port, tok["ann"], args.flood, args.max_tokens,
                          "user" if args.flood_adapter == "lora" else "none")
            # every flood request is in the engine: decoding (at most --max-rows-per-user rows, 8 by default) or
            # queued
            assert wait(lambda: (lambda h: h["generating_rows"] and h["generating_rows"] + h["queued"] == args.flood)(
                health(c))), health(c)
            during = health(c)
            flooded = latencies(c, tok["bob"], args.scores)
            victim_steps: list[int] = []
            flooded_c = completion_latencies(c, tok["bob"], completions, args.victim_tokens, victim_steps)
            flood_on = health(c)["generating_rows"] > 0  # False: the flood ended before the victim's requests
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
    cp = {}
    if completions:
        cp = {"c_alone_p50": statistics.median(alone_c), "c_alone_p99": p(alone_c, 0.99),
              "c_flood_p50": statistics.median(flooded_c), "c_flood_p99": p(flooded_c, 0.99),
              "c_p99_ratio": p(flooded_c, 0.99) / p(alone_c, 0.99), "completions": completions,
              "c_flood_steps_max": max(victim_steps), "c_flood_steps_p50": statistics.median(victim_steps),
              "c_flood_latencies": [round(x, 3) for x in flooded_c], "c_flood_steps": victim_steps}
    return {**cp, "alone_p50": statistics.median(alone), "alone_p99": p(alone, 0.99),
            "flood_p50": statistics.median(flooded), "flood_p99": p(flooded, 0.99),
            "p99_ratio": p(flooded, 0.99) / p(alone, 0.99),
            "flood_rows_decoding": during["generating_rows"], "flood_on_at_end": flood_on, "flood_queued": during["queued"],
            "max_rows_per_user": during.get("max_rows_per_user"), "most_rows_one_user": later.get("most_rows_one_user"),
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
    ap.add_argument("--completions", type=int, default=40, help="victim short completions (0: none)")
    ap.add_argument("--victim-tokens", type=int, default=8)
    ap.add_argument("--flood-adapter", choices=["none", "lora"], default="none")
    ap.add_argument("--uncapped", action="store_true",
                    help="also run on a server with --max-rows-per-user = --max-batch (before the cap)")
    ap.add_argument("--server-args", default="", help="more `sharedllm serve` options, e.g. \"--max-batch 16\"")
    ap.add_argument("--port", default="8765")
    args = ap.parse_args()
    from machine import describe

    print(describe(), file=sys.stderr)
    runs = [("capped (defaults)", run(args))]
    if args.uncapped:
        batch = args.server_args.split("--max-batch")[1].split()[0] if "--max-batch" in args.server_args else "16"
        runs.append((f"uncapped (--max-rows-per-user {batch})",
                     run(args, ("--max-rows-per-user", batch), int(args.port) + 1, min(2, args.completions))))
    print(f"{describe()}; flood {args.flood} x {args.max_tokens} tokens, adapter {args.flood_adapter}\n")
    print("| server | flood rows decoding + queued | victim | n | p50 alone | p99 alone | p50 flooded | p99 flooded | "
          "p99 ratio (target <= 3) | decode steps per flooded completion, p50 / max |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, q in runs:
        rows = [("score", args.scores, "")] + ([("completion", q["completions"], "c_")] if "completions" in q else [])
        for victim, n, k in rows:
            victim += "" if q["flood_on_at_end"] else " (the flood ended first)"
            print(f"| {name} | {q['flood_rows_decoding']} + {q['flood_queued']} | {victim} | {n} | "
                  f"{q[k + 'alone_p50']:.4f} s | {q[k + 'alone_p99']:.4f} s | {q[k + 'flood_p50']:.4f} s | "
                  f"{q[k + 'flood_p99']:.4f} s | **{q[k + 'p99_ratio']:.2f}** | "
                  f"{(str(q['c_flood_steps_p50']) + ' / ' + str(q['c_flood_steps_max'])) if k else '-'} |")
    r = runs[0][1]
    print("\n| flood rows at disconnect | decode steps after disconnect | time to stop | rows computing 1 s later "
          "| cancelled rows | max steps a row ran after its cancel |\n|---|---|---|---|---|---|")
    print(f"| {r['flood_rows_before_disconnect']} | {r['decode_steps_after_disconnect']} | {r['stop_s']:.3f} s | "
          f"{r['flood_rows_computing_1s_later']} | {r['cancelled_rows']} | {r['cancel_lag_steps_max']} |")
    print(json.dumps(dict(runs)), file=sys.stderr)
    ok = r["p99_ratio"] <= 3 and r.get("c_p99_ratio", 0) <= 3 and r["flood_rows_computing_1s_later"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
