"""Serving latency and throughput on the default base: the continuous-batching server against the old batch
worker and against llama.cpp (llama-cpp-python), all on this machine, side by side in one run.

  old-vs-new   the same 16 requests from 16 users (max_tokens alternating short/long, one arriving every
               --gap-ms) through `sharedllm serve` at this commit and at --old-commit (the batch worker)
  mix          --long long generations running, then --scores score requests one after another: p50/p99 score
               latency (new vs old server, and one server per --prefill-budgets value)
  single       one stream (--single-prompts N: N streams one after another): time to first token, decode tok/s
               and CPU time per decoded token (the server process's, from /proc), sharedllm (HTTP, streamed) vs
               llama.cpp in-process on the same GGUF (no HTTP: favours llama.cpp); --single-decodes
               hf,lean-bf16,lean-int8,lean-int4,lean-int8-head4,lean-int4-head8 adds servers with those decode steps
  concurrent   16 requests from 16 users at once through `sharedllm serve` vs llama.cpp: `llama-server -np 16`
               (parallel slots) when --llama-server names the binary, else llama-cpp-python's OpenAI server
               (`python -m llama_cpp.server`, which runs one request at a time: it has no parallel slots); and
               llama.cpp's batched decode of the same 16 prompts in process (what parallel slots do, no HTTP)

    PYTHONPATH=src python bench/serve_vs_llamacpp.py [--parts old-vs-new,mix,single,concurrent]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

from sharedllm import registry
from sharedllm.base import load_base

from serve_common import MACHINE, ServerProcess, adapter_files, auth, create_users, snippets, upload

N = 16
ROOT = Path(__file__).resolve().parents[1]


def old_tree(commit: str, into: Path) -> Path:
    """The package at `commit`, unpacked with `git archive` (no worktree, no branch)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(blob)).extractall(into)
    return into / "src"


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (from /proc/PID/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_one(c: httpx.Client, token: str, body: dict, pid: int | None = None) -> tuple[float, float, int, float]:
    """(seconds to first text chunk, total seconds, completion tokens, server CPU seconds from the first chunk to
    the end: the decode's CPU, prefill excluded; 0 without `pid`) of one streamed completion."""
    t0, first, n, cpu0 = time.perf_counter(), None, 0, 0.0
    with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}},
                  headers=auth(token)) as r:
        for ln in r.iter_lines():
            if not ln.startswith("data: {"):
                continue
            obj = json.loads(ln[6:])
            if first is None and obj["choices"] and obj["choices"][0]["text"]:
                first = time.perf_counter() - t0
                cpu0 = proc_cpu_s(pid) if pid else 0.0
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, n, (proc_cpu_s(pid) - cpu0) if pid else 0.0


def staggered(url: str, calls: list[tuple[str, dict, str]], gap_s: float, tokens: list | None = None
              ) -> tuple[float, list[float]]:
    """Send call i at i * gap_s; (wall from first send to last answer, each request's latency). With `tokens`
    (a list), each reply's usage.completion_tokens is appended to it."""
    lat = [0.0] * len(calls)
    c = httpx.Client(base_url=url, timeout=900, limits=httpx.Limits(max_connections=len(calls)))
    t0 = time.perf_counter()

    def one(i, path, body, token):
        time.sleep(max(0.0, t0 + i * gap_s - time.perf_counter()))
        t = time.perf_counter()
        r = c.post(path, json=body, headers=auth(token))
        r.raise_for_status()
        lat[i] = time.perf_counter() - t
        if tokens is not None:
            tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=one, args=(i, *call)) for i, call in enumerate(calls)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    c.close()
    return time.perf_counter() - t0, lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def old_vs_new(servers: dict, tokens: dict, users: list[str], prompts: list[str], args) -> dict:
    calls = [("/v1/completions", {"prompt": p, "max_tokens": args.short if i % 2 else args.long, "temperature": 0},
              tokens[users[i]]) for i, p in enumerate(prompts)]
    out = {}
    for name, srv in servers.items():
        wall, lat = staggered(srv.url, calls, args.gap_ms / 1000)
        out[name] = {"wall_s": wall, "p50_latency_s": pct(lat, 0.5), "mean_latency_s": statistics.mean(lat),
                     "short_p50_s": pct(lat[1::2], 0.5), "long_p50_s": pct(lat[0::2], 0.5)}
        print(name, json.dumps(out[name]), flush=True)
    out["new_over_old_wall"] = out["old"]["wall_s"] / out["new"]["wall_s"]
    out["new_over_old_short_p50"] = out["old"]["short_p50_s"] / out["new"]["short_p50_s"]
    return out


def mix(servers: dict, tokens: dict, users: list[str], prompts: list[str], texts: list[str], args) -> dict:
    """--scores scores one after another on the idle server, then again while --n-long long generations (users
    cycling over the 16) decode: p50/p99 score latency idle and under load, per server."""
    out = {}
    for name, srv in servers.items():
        c = httpx.Client(base_url=srv.url, timeout=900)

        def scores():
            lat = []
            for j in range(args.scores):
                t = time.perf_counter()
                c.post("/v1/score", json={"text": texts[j % len(texts)]},
                       headers=auth(tokens[users[-1 - j % 4]])).raise_for_status()
                lat.append(time.perf_counter() - t)
            return lat

        idle = scores()
        gens = [threading.Thread(target=lambda i=i: c.post("/v1/completions", headers=auth(tokens[users[i % N]]), json={
            "prompt": prompts[i % N], "max_tokens": args.long * 2, "temperature": 0})) for i in range(args.n_long)]
        [t.start() for t in gens]
        time.sleep(1.0)  # the long generations are decoding
        lat = scores()
        busy = router_busy(c)
        [t.join() for t in gens]
        c.close()
        out[name] = {"idle_score_p50_s": pct(idle, 0.5), "idle_score_p99_s": pct(idle, 0.99),
                     "score_p50_s": pct(lat, 0.5), "score_p99_s": pct(lat, 0.99),
                     "loaded_over_idle_p99": pct(lat, 0.99) / pct(idle, 0.99), "rows_generating_after": busy}
        print(name, "mix", json.dumps(out[name]), flush=True)
    if "old" in out:
        out["old_over_new_score_p50"] = out["old"]["score_p50_s"] / out["new"]["score_p50_s"]
        out["old_over_new_score_p99"] = out["old"]["score_p99_s"] / out["new"]["score_p99_s"]
    return out


def router_busy(c: httpx.Client):
    """Rows still generating when the last score came back (so the scores really ran under load)."""
    try:
        return c.get("/health").json().get("generating_rows")
    except (httpx.HTTPError, ValueError):
        return None


def single_ours(srv, token: str, prompts: list[str], args) -> dict:
    """Greedy streams through the server, one prompt after another: wall tok/s and the server's CPU seconds per
    decoded token, summed over the prompts (more tokens than one stream that may end early at EOS)."""
    ttft, decode_s, decoded, cpu = [], 0.0, 0, 0.0
    with httpx.Client(base_url=srv.url, timeout=900) as c:
        stream_one(c, token, {"prompt": prompts[0], "max_tokens": 4, "temperature": 0})  # warm
        for prompt in prompts:
            first, total, n, c_s = stream_one(c, token, {"prompt": prompt, "max_tokens": args.long,
                                                         "temperature": 0}, srv.proc.pid)
            ttft, decode_s, decoded, cpu = ttft + [first], decode_s + total - first, decoded + n - 1, cpu + c_s
    return {"ttft_s": ttft[0], "decode_tok_s": decoded / decode_s, "tokens": decoded + len(prompts),
            "decode_cpu_ms_per_token": 1000 * cpu / max(1, decoded)}


def single_llamacpp(prompt: str, args) -> dict:
    """The first prompt's stream in process on llama.cpp: wall tok/s and this process's CPU seconds per decoded
    token (llama.cpp's streams do not stop early here: the base without an adapter)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(registry.gguf_path(registry.resolve("default"))), n_ctx=2048, n_threads=args.threads, verbose=False)
    llm(prompt, max_tokens=4, temperature=0)
    t0, first, n, cpu0 = time.perf_counter(), None, 0, 0.0
    for chunk in llm(prompt, max_tokens=args.long, temperature=0, stream=True):
        if not chunk["choices"][0]["text"]:
            continue  # the closing chunk (finish_reason only) is not a token
        n += 1
        if first is None:
            first, cpu0 = time.perf_counter() - t0, time.process_time()
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"ttft_s": first, "decode_tok_s": (n - 1) / (total - first), "tokens": n,
            "decode_cpu_ms_per_token": 1000 * cpu / max(1, n - 1)}


def single(servers: dict, token: str, prompts: list[str], args) -> dict:
    """Each server (decode mode) in turn, then llama.cpp: ratios of wall tok/s and of CPU time per token."""
    out = {name: single_ours(srv, token, prompts, args) for name, srv in servers.items()}
    theirs = out["llamacpp"] = single_llamacpp(prompts[0], args)
    for name in servers:
        ours = out[name]
        out[f"{name}/llamacpp"] = {"decode_tok_s_ratio": ours["decode_tok_s"] / theirs["decode_tok_s"],
                                   "cpu_per_token_ratio": theirs["decode_cpu_ms_per_token"]
                                   / ours["decode_cpu_ms_per_token"],
                                   "ttft_ratio": ours["ttft_s"] / theirs["ttft_s"]}
    print("single", json.dumps(out), flush=True)
    return out


def batched_llamacpp(prompts: list[str], max_tokens: int, threads: int) -> dict:
    """What llama.cpp's server does with parallel slots, in process (no HTTP: favours llama.cpp): every prompt
    prefilled in one llama_decode, then one llama_decode per step with one greedy token per live sequence, each
    sequence its own seq_id in a unified KV cache."""
    import ctypes

    import llama_cpp as L
    import numpy as np

    path = str(registry.gguf_path(registry.resolve("default")))
    tok = L.Llama(model_path=path, vocab_only=True, verbose=False)
    toks = [tok.tokenize(p.encode(), add_bos=False) for p in prompts]
    eos = tok.token_eos()
    n_seq, n_prompt = len(toks), sum(map(len, toks))
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = n_prompt + n_seq * (max_tokens + 8)
    cp.n_batch = cp.n_ubatch = max(n_prompt, n_seq)
    cp.n_seq_max, cp.kv_unified = n_seq, True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def decode(rows):  # rows: (token, pos, seq, wants_logits) -> {seq: index of its logits}
        for i, (t, pos, sq, lg) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, lg
            batch.seq_id[i][0] = sq
        batch.n_tokens = len(rows)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return {sq: i for i, (_, _, sq, lg) in enumerate(rows) if lg}

    def greedy(i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())

    t0 = time.perf_counter()
    at = decode([(t, j, s, j == len(ts) - 1) for s, ts in enumerate(toks) for j, t in enumerate(ts)])
    nxt = {s: greedy(i) for s, i in at.items()}
    ttft = time.perf_counter() - t0
    made, pos = {s: 1 for s in nxt}, {s: len(toks[s]) for s in nxt}
    live = {s for s in nxt if nxt[s] != eos}
    while live:
        live = {s for s in live if made[s] < max_tokens}
        if not live:
            break
        at = decode([(nxt[s], pos[s], s, True) for s in sorted(live)])
        for s, i in at.items():
            pos[s] += 1
            nxt[s] = greedy(i)
            made[s] += 1
            if nxt[s] == eos:
                live.discard(s)
    wall = time.perf_counter() - t0
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    n = sum(made.values())
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "prefill_s": ttft}


def concurrent(srv, tokens: dict, users: list[str], prompts: list[str], args) -> dict:
    """16 streams from 16 users through `sharedllm serve` vs llama.cpp: its `llama-server` binary with 16 parallel
    slots where --llama-server names one, else llama-cpp-python's server (one request at a time), and the batched
    in-process decode above. tok/s counts the tokens the replies report (greedy rows may end early at EOS)."""
    port = args.port + 7
    gguf = str(registry.gguf_path(registry.resolve("default")))
    if args.llama_server:
        name = f"llama-server -np {N}"
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads),
               "-np", str(N), "-c", str(N * 512), "--no-webui"]
    else:
        name = "llama_cpp.server (serial)"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
               "--n_threads", str(args.threads), "--n_ctx", "4096"]
    llama = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out = {}
        for who, url, key in (("sharedllm", srv.url, None), (name, f"http://127.0.0.1:{port}", "x")):
            calls = [("/v1/completions", {"prompt": p, "max_tokens": args.long, "temperature": 0},
                      key or tokens[users[i]]) for i, p in enumerate(prompts)]
            staggered(url, calls[:2], 0.0)  # warm
            made: list[int] = []
            wall, lat = staggered(url, calls, 0.0, made)
            out[who] = {"wall_s": wall, "tokens": sum(made), "tok_s": sum(made) / wall, "p50_latency_s": pct(lat, 0.5)}
            print("concurrent", who, json.dumps(out[who]), flush=True)
    finally:
        llama.terminate()
        llama.wait()
    out["llama.cpp batched in-process"] = batched_llamacpp(prompts, args.long, args.threads)
    print("concurrent batched", json.dumps(out["llama.cpp batched in-process"]), flush=True)
    for who in (name, "llama.cpp batched in-process"):
        out[f"sharedllm_over_{who}_tok_s"] = out["sharedllm"]["tok_s"] / out[who]["tok_s"]
    return out


def single_part(new, work: Path, token: str, prompts: list[str], args) -> dict:
    """`single` against the server as started (--decode lean) and one more server per --single-decodes mode."""
    dtypes = ("bf16", "int8", "int4", "int8-head4", "int4-head8")
    extra = {"hf": ["--decode", "hf"], "lean": ["--decode-dtype", "fp32"]} | {f"lean-{d}": ["--decode-dtype", d]
                                                                             for d in dtypes}
    first = "lean" if args.decode_dtype == "fp32" else f"lean-{args.decode_dtype}"  # the server as started
    servers, started = {first: new}, []
    try:
        for i, mode in enumerate(m for m in args.single_decodes.split(",") if m and m != first):
            srv = ServerProcess("default", work / "store", args.port + 2 + i, "--max-batch", str(N), *extra[mode])
            servers[mode] = srv.start()
            started.append(srv)
        return single(servers, token, prompts, args)
    finally:
        for srv in started:
            srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="old-vs-new,mix,single,concurrent")
    ap.add_argument("--old-commit", default="d80473f")
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=64)
    ap.add_argument("--gap-ms", type=float, default=150)
    ap.add_argument("--n-long", type=int, default=8)
    ap.add_argument("--scores", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--no-old", action="store_true", help="mix: the new server only (no old-commit server)")
    ap.add_argument("--decode-dtype", default="fp32",
                    help="the new server's --decode-dtype (mix, concurrent, and single's `lean` row)")
    ap.add_argument("--prefill-budgets", default="",
                    help="mix: also a server per `--prefill-budget` value given here, comma-separated (e.g. 16384,128)")
    ap.add_argument("--single-decodes", default="lean",
                    help="single: also these decode modes, each its own server (hf, lean-bf16, lean-int8, lean-int4, "
                         "lean-int8-head4, lean-int4-head8)")
    ap.add_argument("--single-prompts", type=int, default=1,
                    help="single: stream this many prompts one after another per server (CPU summed)")
    ap.add_argument("--llama-server", default=None, help="a llama.cpp `llama-server` binary (parallel slots)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    base = load_base("default")
    work = Path(tempfile.mkdtemp(prefix="serve-vs-"))
    files = adapter_files(base, N, work / "adapters")
    users = [f"user{i}" for i in range(N)]
    prompts, texts = snippets(N, 120, seed=1), snippets(N, 400, seed=2)
    new = ServerProcess("default", work / "store", args.port, "--max-batch", str(N), "--decode-dtype", args.decode_dtype)
    servers = {"new": new}
    if "old-vs-new" in parts or ("mix" in parts and not args.no_old):
        old = ServerProcess("default", work / "store", args.port + 1, "--max-batch", str(N))
        old.cmd = ["env", f"PYTHONPATH={old_tree(args.old_commit, work / 'old')}", *old.cmd]
        servers["old"] = old
    if "mix" in parts:
        for i, b in enumerate(x for x in args.prefill_budgets.split(",") if x):
            servers[f"budget-{b}"] = ServerProcess("default", work / "store", args.port + 20 + i, "--max-batch", str(N),
                                                   "--prefill-budget", b)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": MACHINE, "base": base.name, "args": vars(args)}
    try:
        new.start()
        tokens = create_users(new.url, users)
        for u, d in zip(users, files):
            upload(new.url, u, tokens[u], d)
        for name, srv in servers.items():
            if name != "new":
                srv.start()
        for name, srv in servers.items():  # warm every code path once
            staggered(srv.url, [("/v1/completions", {"prompt": "hi", "max_tokens": 2}, tokens[users[0]]),
                                ("/v1/score", {"text": texts[0]}, tokens[users[1]])], 0.0)
        if "old-vs-new" in parts:
            report["old_vs_new"] = old_vs_new(servers, tokens, users, prompts, args)
        if "mix" in parts:
            report["mix"] = mix(servers, tokens, users, prompts, texts, args)
        for name, srv in servers.items():
            if name != "new":
                srv.stop()
        if "single" in parts:
            report["single"] = single_part(new, work, tokens[users[0]], prompts[: args.single_prompts], args)
        if "concurrent" in parts:
            report["concurrent"] = concurrent(new, tokens, users, prompts, args)
    finally:
        for srv in servers.values():
            srv.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
