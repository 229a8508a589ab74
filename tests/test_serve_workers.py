"""Several real server processes on one store: an upload through one is served by the other at once."""
import hashlib
import os
import subprocess
import sys

import time

import httpx
import pytest

from sharedllm.serve import wait_until_healthy
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, adapter_bytes, alone, free_port, reference_score, text_ids

TEXT = "the cat sat on the mat"


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def serve(store, log, *extra):
    port = free_port()
    cmd = [sys.executable, "-m", "sharedllm.cli", "serve", "--base", "tiny", "--store", str(store),
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, ADMIN_ENV: ADMIN})
    url = f"http://127.0.0.1:{port}"
    if not wait_until_healthy(url, proc, 180):
        proc.kill()
        raise AssertionError(f"server did not start: {open(log.name).read()}")
    return proc, url


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def score(url, token):
    r = httpx.post(f"{url}/v1/score", json={"text": TEXT}, headers=auth(token), timeout=60)
    return r.status_code, r.json()


def test_two_processes_share_one_store(tiny, tmp_path):
    store = tmp_path / "store"
    a_data, b_data = adapter_bytes(tiny, 1, tmp_path), adapter_bytes(tiny, 2, tmp_path)
    with open(tmp_path / "a.log", "w") as la, open(tmp_path / "b.log", "w") as lb:
        (pa, a), (pb, b) = serve(store, la), serve(store, lb)
        try:
            token = httpx.post(f"{a}/v1/users", json={"user": "ann"}, headers=auth(ADMIN)).json()["token"]
            assert score(b, token)[0] == 404  # B knows the user A created; no adapter yet
            assert httpx.put(f"{a}/v1/users/ann/adapter", content=a_data, headers=auth(token)).status_code == 200
            ref_a = reference_score(alone(tiny, a_data), text_ids(tiny, TEXT))
            assert score(b, token)[1]["logprob"] == pytest.approx(ref_a, abs=1e-4)  # served by the other process
            assert score(a, token)[1]["logprob"] == pytest.approx(ref_a, abs=1e-4)
            assert httpx.put(f"{b}/v1/users/ann/adapter", content=b_data, headers=auth(token)).status_code == 200
            ref_b = reference_score(alone(tiny, b_data), text_ids(tiny, TEXT))
            assert score(a, token)[1]["logprob"] == pytest.approx(ref_b, abs=1e-4)  # A's cached copy is stale: not used
            assert httpx.delete(f"{a}/v1/users/ann/adapter", headers=auth(token)).status_code == 200
            assert score(b, token)[0] == 404
        finally:
            stop(pa)
            stop(pb)


def test_serve_workers_n_starts_n_processes_on_one_port(tiny, tmp_path):
    store = tmp_path / "store"
    data = adapter_bytes(tiny, 3, tmp_path)
    with open(tmp_path / "w.log", "w") as log:
        proc, url = serve(store, log, "--workers", "2")
        try:
            token = httpx.post(f"{url}/v1/users", json={"user": "ann"}, headers=auth(ADMIN)).json()["token"]
            assert httpx.put(f"{url}/v1/users/ann/adapter", content=data, headers=auth(token)).status_code == 200
            ref = reference_score(alone(tiny, data), text_ids(tiny, TEXT))
            for _ in range(6):  # whichever worker answers has the upload
                assert score(url, token)[1]["logprob"] == pytest.approx(ref, abs=1e-4)
            deadline = time.monotonic() + 300  # on a loaded machine the second worker may still be importing torch
            while open(tmp_path / "w.log").read().count("Started server process") < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stop(proc)
    assert open(tmp_path / "w.log").read().count("Started server process") == 2


RACE_REPLACES = 1000


def test_two_workers_race_replace_against_reads(tiny, tmp_path):
    """Issue 34: with `--workers 2` on one store, the owner replaces their adapter 1,000 times (a LoRA and a norm
    file, alternating) while the owner and the admin read it back: every read is a 200 with exactly one of the two
    files (never a half-replaced one) or a 404, and no request anywhere is a 5xx."""
    import threading

    store = tmp_path / "store"
    files = [adapter_bytes(tiny, 4, tmp_path, method="lora"), adapter_bytes(tiny, 5, tmp_path)]
    records = {hashlib.sha256(f).hexdigest(): (len(f), m) for f, m in zip(files, ("lora", "norm"))}
    statuses, bad = {}, []
    lock = threading.Lock()

    def note(r, what):
        with lock:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500 or (what == "get" and r.status_code == 200 and not whole(r.json())):
                bad.append((what, r.status_code, r.content[:200]))

    def whole(rec):  # the record of one of the two files, all of it (sha256, size and method agree)
        return records.get(rec.get("sha256")) == (rec.get("bytes"), rec.get("method"))

    with open(tmp_path / "w.log", "w") as log:
        proc, url = serve(store, log, "--workers", "2")
        try:
            token = httpx.post(f"{url}/v1/users", json={"user": "ann"}, headers=auth(ADMIN)).json()["token"]
            done = threading.Event()

            def writer():
                with httpx.Client(timeout=60) as c:
                    for i in range(RACE_REPLACES):
                        note(c.put(f"{url}/v1/users/ann/adapter", content=files[i % 2], headers=auth(token)), "put")
                done.set()

            def reader(who):
                with httpx.Client(timeout=60) as c:
                    while not done.is_set():
                        note(c.get(f"{url}/v1/users/ann/adapter", headers=auth(who)), "get")

            threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(t,))
                                                            for t in (token, ADMIN)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            stop(proc)
    assert bad == []
    assert statuses.get(200, 0) >= RACE_REPLACES + 2  # every replace acknowledged, and reads happened
    assert set(statuses) <= {200, 404}, statuses
    assert "Traceback" not in open(tmp_path / "w.log").read()
