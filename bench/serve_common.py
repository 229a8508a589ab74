"""Helpers shared by the serving benchmarks: synthetic users' adapters, a real `sharedllm serve` subprocess,
concurrent HTTP clients, text snippets from the shared corpora."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from sharedllm.personalise import new_adapter, save_adapted
from sharedllm.serve import wait_until_healthy

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
ADMIN = "bench-admin-token-0123456789abcdefghij"
MACHINE = "2 vCPU x86_64 AVX2, 24 GiB, no GPU"


def adapter_files(base, n: int, out: Path, scale: float = 0.05, seed0: int = 0) -> list[bytes]:
    """n norm adapters for `base`: the base gains times (1 + scale * noise), saved exactly as the CLI saves."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        a = new_adapter(base, "norm")
        g = torch.Generator().manual_seed(seed0 + i)
        with torch.no_grad():
            for p in a.params.values():
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
        save_adapted(a, out / f"user{i}.safetensors", base)
        files.append((out / f"user{i}.safetensors").read_bytes())
    return files


def snippets(n: int, chars: int, seed: int = 0) -> list[str]:
    """n pieces of real text (novels, Wikipedia, speeches) of about `chars` characters, cut at spaces."""
    names = ["novelist/austen_pride_and_prejudice.txt", "novelist/shelley_frankenstein.txt",
             "general/wikipedia_squad_paragraphs.txt", "heterogeneous/speeches_reagan_sotu.txt"]
    texts = [(CORPORA / n_).read_text() for n_ in names]
    out = []
    for i in range(n):
        t = texts[i % len(texts)]
        start = t.find(" ", 10_000 + 7919 * (i + seed)) + 1
        out.append(t[start: t.rfind(" ", start, start + chars)])
    return out


class ServerProcess:
    """`sharedllm serve` in a subprocess on loopback; the admin token comes from the environment."""

    def __init__(self, base: str, store: Path, port: int, *extra: str, log: Path | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "sharedllm.cli", "serve", "--base", base, "--store", str(store),
                    "--port", str(port), *extra]
        self.log = log or store.parent / f"server-{port}.log"
        self.proc = None

    def start(self, timeout: float = 300) -> "ServerProcess":
        env = {**os.environ, "SHAREDLLM_ADMIN_TOKEN": ADMIN}
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env)
        if wait_until_healthy(self.url, self.proc, timeout):
            return self
        raise RuntimeError(f"server did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def create_users(url: str, names: list[str]) -> dict[str, str]:
    with httpx.Client(base_url=url, timeout=60) as c:
        out = {}
        for n in names:
            r = c.post("/v1/users", json={"user": n}, headers=auth(ADMIN))
            r.raise_for_status()
            out[n] = r.json()["token"]
        return out


def upload(url: str, user: str, token: str, data: bytes) -> dict:
    r = httpx.put(f"{url}/v1/users/{user}/adapter", content=data, headers=auth(token), timeout=60)
    r.raise_for_status()
    return r.json()


def fire(url: str, calls: list[tuple[str, dict, str]]) -> tuple[float, list]:
    """Send every (path, json, token) at once from its own thread; (wall seconds, responses in order)."""
    out = [None] * len(calls)
    gate = threading.Barrier(len(calls) + 1)
    client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(calls)))

    def one(i, path, body, token):
        gate.wait()
        r = client.post(path, json=body, headers=auth(token))
        out[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=one, args=(i, *c)) for i, c in enumerate(calls)]
    [t.start() for t in threads]
    gate.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    client.close()
    bad = [o for o in out if o[0] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return wall, [o[1] for o in out]
