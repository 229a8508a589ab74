"""Load on the real server: N concurrent clients on loopback, mixed users, bounded duration and request count.

Every client cycles through the users, so concurrent requests of different users share batches. Three in four
requests score a text, one in four asks for a greedy completion. Before the load, every (user, text) score and
every (user, prompt) greedy completion is computed in-process with that user's model alone
(`load_adapted(...).model`); each response is checked against it (the cross-user check).
Reports requests/s, p50/p99 latency, error count, mismatches and the batch sizes the server formed.

    PYTHONPATH=src python bench/serve_load.py [--base default] [--clients 8] [--users 8] [--duration 60]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from sharedllm.base import load_base
from sharedllm.personalise import load_adapted

from serve_common import MACHINE, ServerProcess, adapter_files, auth, create_users, snippets, upload

GEN_TOKENS = 8


@torch.inference_mode()
def references(base, files, texts, prompts):
    tok = base.tokenizer
    score, gen = {}, {}
    for u, data in files.items():
        model = load_adapted(base, data=data, source=u).model
        for t in texts:
            ids = torch.tensor([[tok.bos_id] + tok.encode(t)])
            logits = model(input_ids=ids).logits[0, :-1]
            score[u, t] = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None]).sum().item()
        for p in prompts:
            ids = torch.tensor([[tok.bos_id] + tok.encode(p)])
            out = model.generate(input_ids=ids, max_new_tokens=GEN_TOKENS, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
            gen[u, p] = tok.decode(out[0, ids.shape[1]:].tolist())
    return score, gen


def client(i, url, users, tokens, texts, prompts, refs, stop, log):
    k = 0
    with httpx.Client(base_url=url, timeout=300) as c:
        while not stop.is_set():
            u = users[(i + k) % len(users)]
            t0 = time.perf_counter()
            if k % 4 == 3:
                p = prompts[k % len(prompts)]
                r = c.post("/v1/completions", json={"prompt": p, "max_tokens": GEN_TOKENS, "temperature": 0},
                           headers=auth(tokens[u]))
                ok = r.status_code == 200
                match = ok and r.json()["choices"][0]["text"] == refs[1][u, p]
                diff = 0.0
            else:
                t = texts[k % len(texts)]
                r = c.post("/v1/score", json={"text": t}, headers=auth(tokens[u]))
                ok = r.status_code == 200
                diff = abs(r.json()["logprob"] - refs[0][u, t]) if ok else 0.0
                match = ok and diff < 1e-3
            log.append(("gen" if k % 4 == 3 else "score", time.perf_counter() - t0, ok, match, diff))
            k += 1
            if len(log) >= stop.limit:
                stop.set()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="default")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--port", type=int, default=8767)
    args = ap.parse_args()
    base = load_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    users = [f"user{i}" for i in range(args.users)]
    files = dict(zip(users, adapter_files(base, args.users, work / "adapters", scale=0.1)))
    texts, prompts = snippets(3, 300, seed=3), snippets(2, 80, seed=4)
    refs = references(base, files, texts, prompts)
    log: list = []
    with ServerProcess(args.base, work / "store", args.port, "--max-batch", str(args.clients)) as server:
        tokens = create_users(server.url, users)
        for u in users:
            upload(server.url, u, tokens[u], files[u])
        stop = threading.Event()
        stop.limit = args.requests
        threads = [threading.Thread(target=client, args=(i, server.url, users, tokens, texts, prompts, refs,
                                                         stop, log)) for i in range(args.clients)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        stop.wait(args.duration)
        stop.set()
        [t.join() for t in threads]
        wall = time.perf_counter() - t0
        health = httpx.get(f"{server.url}/health").json()
    lat = lambda kind, q: float(np.percentile([x[1] for x in log if kind in (None, x[0])], q) * 1e3)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": MACHINE, "base": base.name, "clients": args.clients,
        "users": args.users, "requests": len(log), "wall_s": wall, "requests_per_s": len(log) / wall,
        "latency_ms": {k or "all": {"p50": lat(k, 50), "p99": lat(k, 99)} for k in (None, "score", "gen")},
        "errors": sum(not x[2] for x in log), "cross_user_mismatches": sum(x[2] and not x[3] for x in log),
        "score_max_abs_diff": max(x[4] for x in log),
        "server": {k: health[k] for k in ("batches", "rows", "largest_batch")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
