"""The server over a real loopback socket: uvicorn in a thread, then the real `sharedllm serve` command."""
import os
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sharedllm.serve import build, wait_until_healthy
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, LiveServer, adapter_bytes, alone, free_port, reference_score, text_ids


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_mixed_users_over_loopback(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp_path / "store", window_s=0.3, max_batch=6)
    users = [f"user{i}" for i in range(6)]
    data = {u: adapter_bytes(tiny, i, tmp_path) for i, u in enumerate(users)}
    texts = {u: f"the cat number {i} sat on mat {i * 7}" for i, u in enumerate(users)}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.get("/health").json()["status"] == "ok"
        toks = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"] for u in users}
        assert c.post("/v1/score", json={"text": "x y"}).status_code == 401
        assert c.put(f"/v1/users/{users[0]}/adapter", content=data[users[0]],
                     headers=auth(toks[users[1]])).status_code == 403
        assert c.post("/v1/score", json={"text": "x y"}, headers=auth(toks[users[0]])).status_code == 404
        for u in users:
            assert c.put(f"/v1/users/{u}/adapter", content=data[u], headers=auth(toks[u])).status_code == 200
        with ThreadPoolExecutor(len(users)) as pool:
            got = dict(zip(users, pool.map(
                lambda u: c.post("/v1/score", json={"text": texts[u]}, headers=auth(toks[u])).json(), users)))
        assert router.stats()["largest_batch"] >= 2
    for u in users:
        ref = reference_score(alone(tiny, data[u]), text_ids(tiny, texts[u]))
        assert got[u]["logprob"] == pytest.approx(ref, abs=1e-4) and got[u]["user"] == u
    router.close()
    router.store.close()


def _start(store, port, log):
    env = {k: v for k, v in os.environ.items() if k != ADMIN_ENV}
    cmd = [sys.executable, "-m", "sharedllm.cli", "serve", "--base", "tiny", "--store", str(store),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if wait_until_healthy(f"http://127.0.0.1:{port}", proc, 120):
        return proc
    proc.kill()
    raise AssertionError(f"server did not start: {open(log.name).read()}")


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_serve_command_generates_a_private_admin_token_and_survives_a_restart(tiny, tmp_path):
    store, port = tmp_path / "store", free_port()
    url = f"http://127.0.0.1:{port}"
    data = adapter_bytes(tiny, 4, tmp_path)
    with open(tmp_path / "server.log", "w") as log:
        proc = _start(store, port, log)
        try:
            admin = (store / "admin_token").read_text().strip()
            assert stat.S_IMODE(os.stat(store / "admin_token").st_mode) == 0o600
            token = httpx.post(f"{url}/v1/users", json={"user": "ann"}, headers=auth(admin)).json()["token"]
            r = httpx.put(f"{url}/v1/users/ann/adapter", content=data, headers=auth(token))
            assert r.status_code == 200
            before = httpx.post(f"{url}/v1/score", json={"text": "the cat sat"}, headers=auth(token)).json()
        finally:
            _stop(proc)
        proc = _start(store, port, log)
        try:
            assert httpx.get(f"{url}/v1/users/ann/adapter", headers=auth(token)).json()["sha256"] == r.json()["sha256"]
            after = httpx.post(f"{url}/v1/score", json={"text": "the cat sat"}, headers=auth(token)).json()
            assert after["logprob"] == pytest.approx(before["logprob"], abs=1e-6)
        finally:
            _stop(proc)
    logged = (tmp_path / "server.log").read_text()
    assert admin not in logged and token not in logged and "admin token" in logged
