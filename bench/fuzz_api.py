"""Fuzz the HTTP API of a real `sharedllm serve --base tiny` subprocess on loopback with seeded hostile requests:
malformed JSON, wrong types, huge / negative / NaN numbers, lone surrogates, path-traversal and odd user names,
missing / forged / other users' tokens, hostile adapter uploads (the adapter fuzzer's mutants, dtype relabellings).

    python bench/fuzz_api.py --n 1000 [--seed 0]

Every request carries what it must get: "4xx" (invalid), "2xx" (valid) or "any" (valid or a clean refusal).
Prints a table: inputs, 5xx, tracebacks (in a response or the server's log), accepted-invalid (2xx for an
invalid request), cross-user access (2xx for a request touching another user's adapter), non-JSON error bodies;
exits 1 on any.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_adapters import fuzz_main, mutate, seeds  # noqa: E402

from sharedllm.base import load_base  # noqa: E402
from sharedllm.serve import wait_until_healthy  # noqa: E402

ADMIN = "fuzz-admin-token-0123456789abcdefghijklmnop"
NUMBERS = [0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 64), 10 ** 400, 1e308, -1e308, 0.5, 1e-320, "5", True,
           None, [], {}]
STRINGS = ["", "a", "\ud800", "x\udfff", "\x00", "é" * 3000, "../../etc/passwd", "ann", "bob", "a" * 70000,
           "\u202e", "ann\n", 5, None]
TINY = [1e-300, 1e-46, 5e-324, 1 - 1e-17, False]  # floats that round to 0 or 1 in float32, and a boolean
MESSAGES = [[{"role": "user", "content": "hi"}], [{"role": "system"}], [{"role": "robot", "content": "x"}],
            [{"role": "user", "content": ["a"]}], [{"role": "user", "content": "\ud800"}] * 3, [], [None]]
# protocol-level requests uvicorn's parser (or the app's front layer) must answer with a JSON 4xx
RAW = [b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
       b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
       b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
       b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
       b"GET /v1/completions/ HTTP/1.1\r\nHost: x\r\n\r\n",
       b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
       b"BREW /v1/score HTTP/1.1\r\nHost: x\r\n\r\n",
       b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
       b"POST /v1/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"]
NAMES = ["ann\n", "../x", "..", ".", "a/b", "%2e%2e", "a" * 65, "", " ", "ann ", "é", "\x00", "x\ud800", "ok_1",
         "a@b.c", 5, None, ["x"]]


def _dump(obj) -> bytes:
    return json.dumps(obj).encode("utf-8", "surrogatepass")


def hostile_body(rng) -> tuple[bytes, bool]:
    """-> (JSON-ish bytes, whether it could be a valid request)."""
    k = rng.randrange(6)
    if k == 0:
        return rng.choice([b"", b"{", b"[]", b"null", b"NaN", b'{"text": NaN}', b'{"prompt": Infinity}',
                           b'{"text": "a", "text": "b"}', b"\xff\xfe{}", b"[" * 10000, b'{"text": "\\ud800"}',
                           bytes(rng.randrange(256) for _ in range(40))]), False
    field = rng.choice(["text", "prompt", "messages"])
    body = {field: rng.choice(STRINGS + (MESSAGES if field == "messages" else []))}
    for _ in range(rng.randrange(4)):
        key = rng.choice(["max_tokens", "temperature", "top_p", "seed", "user", "adapter", "model", "extra",
                          "stream", "n", "stop", "logprobs", "echo", "ignore_eos", "stream_options"])
        body[key] = rng.choice(NUMBERS + STRINGS + TINY + [[], ["a"] * 9, {"include_usage": "yes"}])
    return _dump(body), True


def valid_body(rng, path: str) -> bytes:
    if path.endswith("score"):
        return _dump({"text": rng.choice(["the cat sat", "a b c d", "hello world"]), "adapter": "user"})
    if path.endswith("chat/completions"):
        return _dump({"messages": [{"role": "user", "content": "hi"}], "max_tokens": rng.randint(1, 4),
                      "temperature": rng.choice([0, 0.7]), "ignore_eos": rng.choice([True, False])})
    return _dump({"prompt": "the", "max_tokens": rng.randint(1, 4), "temperature": rng.choice([0, 0.7]),
                  "seed": rng.randrange(2 ** 64), "top_p": rng.choice([1.0, 0.9])})


class Fuzzer:
    def __init__(self, url: str, rng: random.Random, files: list[bytes]):
        self.c = httpx.Client(base_url=url, timeout=60)
        self.rng, self.files = rng, files
        self.tok = {u: self.c.post("/v1/users", json={"user": u}, headers=self._auth(ADMIN)).json()["token"]
                    for u in ("ann", "bob", "cy")}
        for u in ("ann", "bob"):
            assert self.c.put(f"/v1/users/{u}/adapter", content=files[0], headers=self._auth(self.tok[u])).is_success

    @staticmethod
    def _auth(token):
        return {"Authorization": f"Bearer {token}"} if token is not None else {}

    def case(self):
        """-> (method, path, headers, body, expected, cross_user)."""
        rng = self.rng
        who = rng.choice(["ann", "bob", "cy", None, "forged", "admin"])
        token = {"forged": "sk-" + "A" * 43, "admin": ADMIN, None: None}.get(who, self.tok.get(who))
        k = rng.randrange(6)
        if k == 5:  # protocol-level: duplicate / negative / non-numeric lengths, NUL in a header, odd methods
            return "RAW", "(raw)", {}, rng.choice(RAW), "4xx", False
        if k == 0:  # model endpoints with hostile bodies
            path = rng.choice(["/v1/score", "/v1/completions", "/v1/chat/completions"])
            body, maybe = hostile_body(rng) if rng.random() < 0.8 else (valid_body(rng, path), True)
            ok_caller = who in ("ann", "bob", "cy")
            return "POST", path, self._auth(token), body, ("any" if maybe and ok_caller else "4xx"), False
        if k == 1:  # adapter endpoints, own or someone else's, traversal names
            target = rng.choice(["ann", "bob", "cy", "nobody"] + [n for n in NAMES if isinstance(n, str) and n])
            method = rng.choice(["GET", "DELETE", "PUT"])
            body = mutate(rng, rng.choice(self.files))[0] if method == "PUT" else b""
            if method == "PUT" and rng.random() < 0.2:
                body = rng.choice(self.files)
            own = who == target and who in ("ann", "bob", "cy")
            expect = "any" if own or (who == "admin" and method != "PUT") else "4xx"
            cross = who in ("ann", "bob", "cy") and target != who
            if method == "DELETE" and own:  # keep the fixture alive: put the adapter straight back afterwards
                expect = "any"
            return method, f"/v1/users/{quote(target, safe='./@', errors='surrogatepass')}/adapter", self._auth(token), body, expect, cross
        if k == 2:  # user creation with odd names and types
            name = rng.choice(NAMES + [f"fz{rng.randrange(10 ** 9)}"])
            valid = isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name)
            expect = "any" if who == "admin" and valid else "4xx"
            return "POST", "/v1/users", self._auth(token), _dump({"user": name}), expect, False
        if k == 3:  # claims to be another user in the body
            body = _dump({"text": "the cat", "user": rng.choice(["ann", "bob", "cy"])})
            claimed = json.loads(body)["user"]
            cross = who in ("ann", "bob", "cy") and claimed != who
            return "POST", "/v1/score", self._auth(token), body, ("4xx" if cross or who not in self.tok else "any"), \
                cross
        size = rng.choice([10 ** 6, 10 ** 8, 2 ** 40])  # declared huge bodies, sent small
        headers = {**self._auth(token), "content-length": str(size)}
        return "POST", rng.choice(["/v1/score", "/v1/completions", "/v1/users"]), headers, b"{}", "4xx", False

    def send(self, method, path, headers, body):
        try:
            if method == "RAW":
                return self._raw_bytes(body)
            if "content-length" in headers:  # a lying Content-Length needs a raw request
                return self._raw(method, path, headers, body)
            r = self.c.request(method, path, headers=headers, content=body)
            return r.status_code, r.text
        except httpx.HTTPError as e:
            return 0, f"client error {type(e).__name__}"

    def _raw(self, method, path, headers, body):
        host, port = self.c.base_url.host, self.c.base_url.port
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return self._raw_bytes(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _raw_bytes(self, request: bytes):
        import socket

        host, port = self.c.base_url.host, self.c.base_url.port
        with socket.create_connection((host, port), timeout=60) as s:
            s.sendall(request)
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < _length(got):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        head, _, rest = got.decode("latin-1").partition("\r\n\r\n")
        status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/1.1") else 0
        return status, rest


def run(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"inputs": 0, "2xx": 0, "4xx": 0, "5xx": 0, "no response": 0, "tracebacks": 0, "accepted-invalid": 0,
              "cross-user access": 0, "non-JSON errors": 0}
    with tempfile.TemporaryDirectory() as d:
        files = seeds(load_base("tiny"), Path(d))
        port = _free_port()
        log = open(Path(d) / "server.log", "w")
        env = {**os.environ, "SHAREDLLM_ADMIN_TOKEN": ADMIN}
        proc = subprocess.Popen([sys.executable, "-m", "sharedllm.cli", "serve", "--base", "tiny", "--store",
                                 str(Path(d) / "store"), "--port", str(port), "--read-timeout-s", "1",
                                 "--max-queued-per-user", "64"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            assert wait_until_healthy(f"http://127.0.0.1:{port}", proc, 120), "server did not start"
            fz = Fuzzer(f"http://127.0.0.1:{port}", rng, files)
            for i in range(n):
                method, path, headers, body, expect, cross = fz.case()
                status, text = fz.send(method, path, headers, body)
                counts["inputs"] += 1
                bad = _tally(counts, status, text, expect, cross)
                if bad:
                    print(f"input {i}: {method} {path[:60]} expect {expect} -> {status} {text[:200]!r}",
                          file=sys.stderr)
                if method == "DELETE" and path in ("/v1/users/ann/adapter", "/v1/users/bob/adapter"):
                    user = path.split("/")[3]
                    fz.c.put(f"/v1/users/{user}/adapter", content=files[0], headers=fz._auth(fz.tok[user]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
        logged = (Path(d) / "server.log").read_text()
        counts["tracebacks"] += logged.count("Traceback")
        if "Traceback" in logged:
            print(logged[logged.index("Traceback"):][:3000], file=sys.stderr)
    return counts


def _tally(counts, status, text, expect, cross) -> bool:
    counts["2xx" if 200 <= status < 300 else "4xx" if 400 <= status < 500 else "5xx" if status else
           "no response"] += 1
    bad = not (200 <= status < 500)
    if "Traceback" in text:
        counts["tracebacks"] += 1
        bad = True
    if 200 <= status < 300 and expect == "4xx":
        counts["accepted-invalid"] += 1
        bad = True
    if 200 <= status < 300 and cross:
        counts["cross-user access"] += 1
        bad = True
    if status >= 400:
        try:
            json.loads(text)
        except ValueError:
            counts["non-JSON errors"] += 1
            bad = True
    return bad


def _length(response: bytes) -> int:
    m = re.search(rb"(?i)content-length: *(\d+)", response.split(b"\r\n\r\n", 1)[0])
    return int(m.group(1)) if m else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    return fuzz_main(run, __doc__, ("5xx", "no response", "tracebacks", "accepted-invalid", "cross-user access",
                                    "non-JSON errors"))


if __name__ == "__main__":
    sys.exit(main())
