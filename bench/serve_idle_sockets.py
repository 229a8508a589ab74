"""Idle sockets against a real `sharedllm serve` on loopback (issue 34 item 3): does the server stay responsive,
and bounded in file descriptors, while an attacker holds 1,000 idle connections?

    python bench/serve_idle_sockets.py [--base tiny] [--sockets 1000] [--seconds 15] [--reconnects-per-s 200]

An attacker process keeps up to --sockets connections open that never send a byte, and reopens each one the server
closes (its keep-alive reaping, or a refusal), at most --reconnects-per-s a second (a slowloris that never gives up,
throttled so that it does not take a CPU core from the server on a small machine). A normal client (from
127.0.0.1) sends one score request after another, each on a new connection: for --seconds / 2 before the attack,
--seconds during it, --seconds / 2 after it (once the server has reaped the idle sockets), on the same server, so
the latency ratio compares like with like on a noisy machine; the server's open file descriptors (/proc/PID/fd)
are sampled every 0.1 s during the attack. Scenarios, each on its own server:

  one-address    the attacker's sockets all come from 127.0.0.2 (defaults: --max-connections-per-client 64)
  many-addresses one socket per address, 127.1.x.y (the per-client cap cannot help; --max-connections 1024 can)
  total-cap      as many-addresses, with --max-connections 256: what the total cap bounds (the normal client is
                 refused, with a JSON 503, while the attacker holds every slot)

Per scenario: the normal client's p50/p99 latency alone (before and after, pooled) and under the attack (the
window starts once a first request after the attacker's initial burst of 1,000 connects is answered: that one
waits behind the burst, and its time is reported apart), the ratios, how many of its requests got 200 / 503 / a
transport error, the server's file descriptors idle, at most during the attack and after it, what the attacker
held, and the CPU seconds per second of the server (alone and attacked) and of the attacker. The loopback /8 lets
one machine stand in for many client addresses.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from serve_common import ServerProcess, auth, create_users  # noqa: E402

TEXT = "the cat sat on the mat and then ran away from the quick brown dog"
SLOW_S = 0.5  # the normal client's requests slower than this are listed (when during the window, how long)


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def source(i: int, spread: bool) -> str:
    return f"127.1.{i // 250}.{1 + i % 250}" if spread else "127.0.0.2"


def attacker(port: int, n: int, spread: bool, per_s: float, stop, stats) -> None:
    """Hold up to n idle connections; reopen the ones the server closes (at most per_s a second)."""
    raise_fd_limit(n + 256)
    socks: dict[int, tuple[socket.socket, int]] = {}
    poller = select.poll()
    todo = list(range(n))
    opened = closed = refused = failed = 0
    budget, t_last = float(n), time.monotonic()  # the first n connects go at once; then at most per_s a second
    last_report = 0.0
    while not stop.is_set():
        now = time.monotonic()
        budget, t_last = min(max(budget, per_s * 0.05), budget + (now - t_last) * per_s), now
        while todo and budget >= 1:
            i = todo.pop()
            budget -= 1
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source(i, spread), 0))
            except OSError:
                failed += 1
                todo.insert(0, i)
                continue
            s.setblocking(False)
            socks[s.fileno()] = (s, i)
            poller.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
            opened += 1
        for fd, _ev in poller.poll(20):
            s, i = socks.pop(fd)
            poller.unregister(fd)
            try:
                if s.recv(4096).startswith(b"HTTP/1.1 503"):
                    refused += 1
            except OSError:
                pass
            s.close()
            closed += 1
            todo.append(i)
        if now - last_report > 0.2:  # (a Manager dict: each update is a round trip to its process)
            last_report = now
            stats.update(held=len(socks), opened=opened, closed_by_server=closed, refused_503=refused,
                         connect_failed=failed)
    for s, _ in socks.values():
        s.close()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def sample_fds(pid: int, stop, most, samples) -> None:
    """In its own process (listing 1,000 descriptors every 0.1 s in the client's process slowed the client)."""
    while not stop.is_set():
        most.value = max(most.value, fd_count(pid))
        samples.value += 1
        time.sleep(0.1)


def measure(url: str, token: str, pid: int, seconds: float) -> tuple[list[float], dict]:
    """The normal client: scores one after another on new connections, while the server's fds are sampled."""
    stop, most, samples = mp.Event(), mp.Value("i", 0), mp.Value("i", 0)
    t = mp.Process(target=sample_fds, args=(pid, stop, most, samples), daemon=True)
    t.start()
    lat, codes, slow = [], {}, []
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"text": TEXT, "adapter": "none"}).encode()
    request = (b"POST /v1/score HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\n\r\n" + body)
    # a new connection per request, raw (an HTTP client library's own overhead in this process blurred the
    # server's latency under the attack): every request goes through accept
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        code = raw_request(port, request)
        dt = time.perf_counter() - t0
        codes[code] = codes.get(code, 0) + 1
        if code == 200:
            lat.append(dt)
            if dt > SLOW_S:
                slow.append((round(time.monotonic() - (deadline - seconds), 2), round(dt, 3)))
        else:
            time.sleep(0.05)
    stop.set()
    t.join()
    return lat, {"codes": codes, "window_s": seconds, "fds_max": most.value, "fds_samples": samples.value,
                 "slow": slow}


def raw_request(port: int, request: bytes):
    """One request on a new connection: its status code (the body must be JSON), or the error's name."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(request)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    except OSError as e:
        return type(e).__name__
    head, _, payload = out.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return "no response"
    json.loads(payload)  # every answer, 503 included, is JSON
    return int(head.split()[1])


def pcts(lat: list[float], prefix: str) -> dict:
    return {f"{prefix}_n": len(lat), f"{prefix}_p50": statistics.median(lat) if lat else None,
            f"{prefix}_p99": p(lat, 0.99) if lat else None}


def p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def scenario(args, name: str, work: Path, port: int) -> dict:
    extra = ["--max-connections", "256"] if name == "total-cap" else []
    with ServerProcess(args.base, work / f"store-{name}", port, *extra, log=work / f"server-{name}.log") as srv:
        token = create_users(srv.url, ["bob"])["bob"]
        pid = srv.proc.pid
        httpx.post(f"{srv.url}/v1/score", json={"text": TEXT, "adapter": "none"}, headers=auth(token), timeout=60)
        time.sleep(0.5)
        out = {"scenario": name, "fds_idle": fd_count(pid)}
        c0 = cpu_s(pid)
        alone, _ = measure(srv.url, token, pid, args.seconds / 2)
        out["server_cpu_per_s_alone"] = (cpu_s(pid) - c0) / (args.seconds / 2)
        stop, stats = mp.Event(), mp.Manager().dict()
        proc = mp.Process(target=attacker, args=(port, args.sockets, name != "one-address",
                                                 args.reconnects_per_s, stop, stats))
        proc.start()
        t0 = time.monotonic()
        while stats.get("opened", 0) < args.sockets and time.monotonic() - t0 < 60:
            time.sleep(0.1)  # the first 1,000 connects are in
        out["attack_ramp_s"] = round(time.monotonic() - t0, 2)
        # the first request after the ramp waits behind the burst of connects in the listen queue; the window
        # below starts once the server has caught up
        t1 = time.perf_counter()
        r = httpx.post(f"{srv.url}/v1/score", json={"text": TEXT, "adapter": "none"}, headers=auth(token), timeout=120)
        out["first_after_ramp_s"], out["first_after_ramp_status"] = round(time.perf_counter() - t1, 3), r.status_code
        c0, a0 = cpu_s(pid), cpu_s(proc.pid)
        attacked, seen = measure(srv.url, token, pid, args.seconds)
        out["server_cpu_per_s_attack"] = (cpu_s(pid) - c0) / args.seconds
        out["attacker_cpu_per_s"] = (cpu_s(proc.pid) - a0) / args.seconds
        out.update(seen)
        out["attacker"] = dict(stats)
        stop.set()
        proc.join(30)
        time.sleep(args.keep_alive_wait)
        out["fds_after"] = fd_count(pid)
        after, _ = measure(srv.url, token, pid, args.seconds / 2)
        out["after_status"] = 200 if after else None
        out.update(pcts(alone + after, "alone"))
        out.update(pcts(attacked, "attack"))
    logged = (work / f"server-{name}.log").read_text()
    out["log_accept_errors"] = sum(logged.count(s) for s in ("Too many open files", "out of system resource"))
    out["log_tracebacks"] = logged.count("Traceback")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--reconnects-per-s", type=float, default=200.0)
    ap.add_argument("--keep-alive-wait", type=float, default=7.0, help="after the attack: more than --keep-alive-s")
    ap.add_argument("--port", type=int, default=8771)
    ap.add_argument("--scenarios", default="one-address,many-addresses,total-cap")
    args = ap.parse_args()
    raise_fd_limit(args.sockets + 512)
    work = Path(tempfile.mkdtemp(prefix="idle-sockets-"))
    print(describe(), file=sys.stderr)
    rows = []
    for i, name in enumerate(args.scenarios.split(",")):
        rows.append(scenario(args, name, work, args.port + i))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{describe()}; --sockets {args.sockets}, --seconds {args.seconds:g}, attacker reconnects <= "
          f"{args.reconnects_per_s:g}/s\n")
    print("| scenario | alone p50 / p99 (n) | under attack p50 / p99 (n) | p50, p99 ratio | under attack: 200 / 503 "
          "/ transport errors | first request after the ramp | server fds idle / most during / after | attacker "
          "held at the end, opened, 503s read | server CPU s/s alone, attacked; attacker's | accept errors / "
          "tracebacks in the log |\n|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: f"{x * 1000:.0f} ms" if x else "-"
    for r in rows:
        a = r.get("attacker", {})
        ratio = r["attack_p99"] / r["alone_p99"] if r["attack_p99"] and r["alone_p99"] else None
        ratio50 = r["attack_p50"] / r["alone_p50"] if r["attack_p50"] and r["alone_p50"] else None
        errs = sum(v for k, v in r["codes"].items() if k not in (200, 503))
        print(f"| {r['scenario']} | {fmt(r['alone_p50'])} / {fmt(r['alone_p99'])} ({r['alone_n']}) | "
              f"{fmt(r['attack_p50'])} / {fmt(r['attack_p99'])} ({r['attack_n']}) | "
              f"{f'{ratio50:.2f}, **{ratio:.2f}**' if ratio else '-'} | {r['codes'].get(200, 0)} / "
              f"{r['codes'].get(503, 0)} / {errs} | {r['first_after_ramp_s']:.2f} s ({r['first_after_ramp_status']}) | "
              f"{r['fds_idle']} / {r['fds_max']} / {r['fds_after']} | {a.get('held', '-')}, "
              f"{a.get('opened', '-')}, {a.get('refused_503', '-')} | {r['server_cpu_per_s_alone']:.2f}, "
              f"{r['server_cpu_per_s_attack']:.2f}; {r['attacker_cpu_per_s']:.2f} | {r['log_accept_errors']} / "
              f"{r['log_tracebacks']} |")
    bad = any(r["log_accept_errors"] or r["log_tracebacks"] or r["after_status"] != 200 for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
