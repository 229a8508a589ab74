"""Issue 34, strictly served: extreme sampling stays finite, wrong-typed fields are refused (never coerced), a read
racing a replace is a 200 or a 404, no trailing-slash redirects, a client that hangs up mid-body logs nothing, and
the HTTP parser's own 400s (bad Content-Length, a NUL in a header, ...) have JSON bodies."""
import itertools
import json
import logging
import socket
import threading
import time

import pytest
import httpx
import torch

from sharedllm import wire
from sharedllm.serve import build
from sharedllm.serve.compute import pick
from sharedllm.store import ADMIN_ENV, AdapterStore, sha256_hex

from .serve_kit import ADMIN, LiveServer, adapter_bytes
from .test_serve import auth, server, two_users  # noqa: F401  (fixtures)
from .test_serve_hostile import clean_4xx

# ---- 1. sampling is finite for every accepted top_p, temperature and seed ----------------------------------------
TINY_TOP_PS = [5e-324, 1e-300, 1e-46, 1e-8]
TEMPERATURES = [5e-324, 1e-300, 1e-8, 1.0, 5.0]
SEEDS = [0, (1 << 64) - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_tiny_top_p_keeps_exactly_the_top_token(dtype):
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0], dtype=dtype)
    for top_p, temperature, seed in itertools.product(TINY_TOP_PS, TEMPERATURES, SEEDS):
        assert pick(logits, temperature, torch.Generator().manual_seed(seed), top_p) == 1, (top_p, temperature)


def test_a_top_p_just_below_one_still_samples_every_token():
    logits = torch.zeros(4)  # uniform: the nucleus of mass 1 - 1e-12 needs all four tokens
    g = torch.Generator().manual_seed(0)
    assert {pick(logits, 1.0, g, 1 - 1e-12) for _ in range(200)} == {0, 1, 2, 3}


@pytest.mark.parametrize("stream", [False, True])
def test_extreme_sampling_answers_200_through_the_server(server, two_users, stream):
    toks, _ = two_users
    for top_p, temperature, seed in itertools.product(TINY_TOP_PS + [0.5, 1.0], TEMPERATURES, SEEDS):
        body = {"prompt": "a", "max_tokens": 2, "temperature": temperature, "top_p": top_p, "seed": seed,
                "stream": stream}
        r = server.client.post("/v1/completions", json=body, headers=auth(toks["ann"]))
        assert r.status_code == 200 and '"error"' not in r.text, (body, r.status_code, r.text)
        if stream:
            assert r.text.rstrip().endswith("data: [DONE]"), (body, r.text)
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1, body
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_p": 5e-324, "stream": stream}
    r = server.client.post("/v1/chat/completions", json=chat, headers=auth(toks["ann"]))
    assert r.status_code == 200 and '"error"' not in r.text, r.text


# ---- 2. no coercion: strings, booleans and floats are not integers; strings and booleans are not floats -----------
WRONG_TYPES = [("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 5.0), ("temperature", "0.5"),
               ("temperature", True), ("seed", "12"), ("seed", 3.0), ("seed", True), ("stream", "false"),
               ("stream", 0), ("stream", "no"), ("n", True), ("top_p", "1"), ("top_p", False), ("n", 1.0),
               ("stream_options", {"include_usage": 1}), ("ignore_eos", "true"), ("ignore_eos", 1)]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path, field, value", [("/v1/completions", *c) for c in WRONG_TYPES] +
                         [("/v1/chat/completions", *c) for c in WRONG_TYPES + [("max_completion_tokens", "5"),
                                                                               ("max_completion_tokens", 5.0)]])
def test_a_wrong_typed_field_is_a_422_naming_it(server, two_users, path, field, value):
    toks, _ = two_users
    body = {**({"prompt": "the"} if path == "/v1/completions" else CHAT), "max_tokens": 2, field: value}
    errors = clean_4xx(server.client.post(path, json=body, headers=auth(toks["ann"])), 422)["detail"]
    assert errors and all(e["loc"][0] == field for e in errors), errors


@pytest.mark.parametrize("field, value", [("temperature", 1), ("temperature", 0), ("top_p", 1), ("max_tokens", 2),
                                          ("seed", 5), ("stream", False), ("n", 1),
                                          ("stream_options", {"include_usage": True}), ("ignore_eos", True)])
def test_the_right_types_are_still_accepted(server, two_users, field, value):
    toks, _ = two_users
    body = {"prompt": "the", "max_tokens": 2, field: value}
    r = server.client.post("/v1/completions", json=body, headers=auth(toks["ann"]))
    assert r.status_code == 200, r.text


# ---- 3. a read racing a replace: a consistent 200 or a 404, never a 5xx --------------------------------------------
def _get_adapter(server, token):
    client = type(server.client)(server.app, raise_server_exceptions=False)
    return client.get("/v1/users/ann/adapter", headers=auth(token))


def test_a_read_whose_file_is_replaced_under_it_reads_the_new_record(server, two_users, monkeypatch):
    toks, _ = two_users
    real, calls = server.router.file_meta, []

    def replaced_once(sha):  # the first read finds the file gone, as when a replace unlinks it in between
        calls.append(sha)
        if len(calls) == 1:
            raise FileNotFoundError(sha)
        return real(sha)

    monkeypatch.setattr(server.router, "file_meta", replaced_once)
    r = _get_adapter(server, toks["ann"])
    assert r.status_code == 200 and len(calls) == 2, r.text
    assert r.json()["sha256"] == server.router.store.get("ann").sha256 and r.json()["meta"] == real(calls[1])


def test_a_file_that_stays_gone_is_a_json_404(server, two_users, monkeypatch):
    toks, _ = two_users
    monkeypatch.setattr(server.router, "file_meta", lambda sha: (_ for _ in ()).throw(FileNotFoundError(sha)))
    assert "retry" in clean_4xx(_get_adapter(server, toks["ann"]), 404)["detail"]


def test_reads_racing_a_replace_loop_see_no_5xx_and_no_mixed_adapter(server, two_users, tiny, tmp_path,
                                                                      monkeypatch):
    """Another process (its own store connection) replaces ann's adapter in a loop while the server reads it."""
    toks, data = two_users
    versions = [data["ann"], adapter_bytes(tiny, 9, tmp_path, scale=0.5)]
    meta_of = {sha256_hex(d): wire.parse_file(d, "v")[1] for d in versions}
    size_of = {sha256_hex(d): len(d) for d in versions}
    other, stop, replaced = AdapterStore(server.router.store.root), threading.Event(), []
    index_read = server.router.store.get
    monkeypatch.setattr(server.router.store, "get", lambda user: (index_read(user), time.sleep(0))[0])  # yield

    def replace_in_a_loop():
        while not stop.is_set():
            d = versions[len(replaced) % 2]
            other.put("ann", d, meta_of[sha256_hex(d)])
            replaced.append(1)

    writer = threading.Thread(target=replace_in_a_loop)
    writer.start()
    try:
        got = [_get_adapter(server, toks["ann"]) for _ in range(300)]
    finally:
        stop.set()
        writer.join()
        other.close()
    assert len(replaced) > 1 and all(r.status_code in (200, 404) for r in got), \
        sorted({(r.status_code, r.text[:80]) for r in got if r.status_code not in (200, 404)})
    for r in (r.json() for r in got if r.status_code == 200):
        assert r["meta"] == meta_of[r["sha256"]] and r["bytes"] == size_of[r["sha256"]]


# ---- 4. no trailing-slash redirects; an expected disconnect logs no traceback ---------------------------------------
@pytest.mark.parametrize("method, path", [("get", "/v1/completions/"), ("post", "/v1/completions/"),
                                          ("get", "/health/"), ("post", "/v1/score/"),
                                          ("get", "/v1/users/ann/adapter/")])
def test_a_trailing_slash_is_a_json_404_not_a_redirect(server, two_users, method, path):
    toks, _ = two_users
    r = server.client.request(method, path, headers=auth(toks["ann"]), follow_redirects=False)
    assert "detail" in clean_4xx(r, 404) and "location" not in r.headers


class Watched:
    """A live server whose app is wrapped to record what escapes it (uvicorn logs each with a traceback), with
    uvicorn's own log captured and user ann's token."""

    def __init__(self, app, router):
        self.app, self.router, self.escaped, self.done, self.log = app, router, [], threading.Event(), Records()
        self.live = LiveServer(self)

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except BaseException as e:
            self.escaped.append(e)
            raise
        finally:
            if scope["type"] == "http" and scope["path"] != "/v1/users":
                self.done.set()

    def stop(self) -> None:
        """Stop the server: after this every request has finished and been logged."""
        self.live.__exit__(None, None, None)

    def tracebacks(self) -> list:
        return self.escaped + [m for m in self.log.messages if "Exception in ASGI" in m]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def watched(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp_path / "store")
    w = Watched(app, router)
    log = logging.getLogger("uvicorn.error")
    log.addHandler(w.log)
    try:
        with w.live:
            w.token = httpx.post(f"{w.live.url}/v1/users", json={"user": "ann"}, headers=auth(ADMIN)).json()["token"]
            yield w
    finally:
        log.removeHandler(w.log)
        router.close()
        router.store.close()


def _send(port, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("method, path", [("POST", "/v1/score"), ("POST", "/v1/completions"),
                                          ("PUT", "/v1/users/ann/adapter")])
def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(watched, method, path):
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {watched.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", watched.live.port), timeout=30) as s:
        s.sendall(head + b'{"text": "the ca')
    assert watched.done.wait(60), "the server never finished the request"
    watched.stop()
    assert not watched.tracebacks(), watched.tracebacks()
    assert 'status="499"' in watched.router.metrics.render().decode()  # it was the disconnect, answered as such


# ---- 5. the HTTP parser's own refusals are JSON too --------------------------------------------------------------
MALFORMED = {"a Content-Length that is not a number": b"Content-Length: abc\r\n",
             "a negative Content-Length": b"Content-Length: -1\r\n",
             "two different Content-Lengths": b"Content-Length: 2\r\nContent-Length: 3\r\n",
             "a Content-Length of two numbers": b"Content-Length: 1 2\r\n",
             "a NUL in a header value": b"X-A: a\x00b\r\n",
             "a NUL in a header name": b"X-\x00A: b\r\n",
             "an unknown Transfer-Encoding": b"Transfer-Encoding: gzip\r\n"}


def _json_400(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), raw
    return json.loads(body)


@pytest.mark.parametrize("name", MALFORMED)
def test_a_request_the_parser_refuses_is_a_json_400(watched, name):
    raw = b"POST /v1/score HTTP/1.1\r\nHost: x\r\n" + MALFORMED[name] + b"\r\n{}"
    assert "detail" in _json_400(_send(watched.live.port, raw))
    assert not watched.done.is_set()  # refused before the app saw it


def test_a_malformed_request_line_and_a_missing_host_are_json_400s(watched):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n", b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert "detail" in _json_400(_send(watched.live.port, raw)), raw


def test_a_malformed_chunk_after_the_app_started_is_a_json_400_and_no_traceback(watched):
    raw = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {watched.token}\r\n"
           f"Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"te\r\nzz\r\n").encode()
    assert "detail" in _json_400(_send(watched.live.port, raw))
    assert watched.done.wait(60), "the app never finished the request"
    watched.stop()
    assert not watched.tracebacks(), watched.tracebacks()


def test_transfer_encoding_with_content_length_is_a_json_400_and_a_close(watched):
    """Both framings at once (a request-smuggling shape, RFC 9112 6.1): refused, and the connection closed (a
    pipelined request behind it is never answered), not served by Transfer-Encoding's framing."""
    first = b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
    raw = _send(watched.live.port, first + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert "Transfer-Encoding" in _json_400(raw)["detail"]
    assert b"connection: close" in raw.lower()
