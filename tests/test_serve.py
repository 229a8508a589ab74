"""The server in-process (FastAPI TestClient) on the tiny base: auth, adapters, scoring, generation, refusals."""
import math
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from sharedllm import wire
from sharedllm.arch import Base, fingerprint_model
from sharedllm.base import tiny_model
from sharedllm.serve import build
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, adapter_bytes, alone, raw_adapter, reference_score, text_ids

TEXT = "the cat sat on the mat and then ran away"


def auth(token):
    return {"Authorization": f"Bearer {token}"}


class Server:
    def __init__(self, tiny, store_dir, **kw):
        self.app, self.router, _ = build(tiny, store_dir, **kw)
        self.client = TestClient(self.app)

    def user(self, name):
        r = self.client.post("/v1/users", json={"user": name}, headers=auth(ADMIN))
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def put(self, name, token, data):
        return self.client.put(f"/v1/users/{name}/adapter", content=data, headers=auth(token))

    def score(self, token, text=TEXT, **kw):
        return self.client.post("/v1/score", json={"text": text, **kw}, headers=auth(token))

    def close(self):
        self.router.close()
        self.router.store.close()


@pytest.fixture
def server(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def two_users(server, tiny, tmp_path):
    """ann has an adapter, bob has an adapter, cy has none."""
    toks = {u: server.user(u) for u in ("ann", "bob", "cy")}
    data = {u: adapter_bytes(tiny, i, tmp_path) for i, u in enumerate(("ann", "bob"))}
    for u, d in data.items():
        assert server.put(u, toks[u], d).status_code == 200
    return toks, data


def test_health_and_openapi(server):
    h = server.client.get("/health").json()
    assert h["status"] == "ok" and h["base"] == "tiny" and h["adapters"] == 0
    paths = server.client.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/users", "/v1/users/{user}/adapter", "/v1/completions", "/v1/score"} <= set(paths)


@pytest.mark.parametrize("who, method, path, body, status", [
    (None, "post", "/v1/score", {"text": TEXT}, 401),
    ("bad", "post", "/v1/score", {"text": TEXT}, 401),
    (None, "get", "/v1/users/ann/adapter", None, 401),
    ("bad", "put", "/v1/users/ann/adapter", b"x", 401),
    (None, "post", "/v1/users", {"user": "eve"}, 401),
    ("bob", "get", "/v1/users/ann/adapter", None, 403),
    ("bob", "delete", "/v1/users/ann/adapter", None, 403),
    ("bob", "put", "/v1/users/ann/adapter", b"x", 403),
    ("bob", "post", "/v1/users", {"user": "eve"}, 403),
    ("bob", "post", "/v1/score", {"text": TEXT, "user": "ann"}, 403),
    ("admin", "post", "/v1/score", {"text": TEXT}, 403),
    ("admin", "put", "/v1/users/ann/adapter", b"x", 403),
    ("cy", "post", "/v1/score", {"text": TEXT}, 404),
    ("cy", "post", "/v1/completions", {"prompt": "the"}, 404),
    ("cy", "get", "/v1/users/cy/adapter", None, 404),
    ("admin", "get", "/v1/users/nobody/adapter", None, 404),
    ("ann", "get", "/v1/users/ann/adapter", None, 200),
    ("admin", "get", "/v1/users/ann/adapter", None, 200),
])
def test_auth_matrix(server, two_users, who, method, path, body, status):
    toks, _ = two_users
    token = {"bad": "sk-not-a-token", "admin": ADMIN, None: None}.get(who, toks.get(who))
    headers = auth(token) if token else {}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
    r = getattr(server.client, method)(path, headers=headers, **kw) if kw else \
        server.client.request(method.upper(), path, headers=headers)
    assert r.status_code == status, r.text
    if status == 404 and "score" in path:
        assert '"adapter": "none"' in r.json()["detail"]  # says how to ask for the bare base explicitly


def test_user_names_are_checked_and_unique(server):
    server.user("ann")
    assert server.client.post("/v1/users", json={"user": "ann"}, headers=auth(ADMIN)).status_code == 409
    assert server.client.post("/v1/users", json={"user": "../x"}, headers=auth(ADMIN)).status_code == 400


def test_score_matches_the_single_user_reference_and_bare_base_is_explicit(server, two_users, tiny):
    toks, data = two_users
    ids = text_ids(tiny, TEXT)
    for u in ("ann", "bob"):
        r = server.score(toks[u]).json()
        ref = reference_score(alone(tiny, data[u]), ids)
        assert r["tokens"] == len(ids) - 1 and r["logprob"] == pytest.approx(ref, abs=1e-4)
        assert r["ppl"] == pytest.approx(math.exp(-ref / (len(ids) - 1)), rel=1e-5)
    bare = server.score(toks["cy"], adapter="none").json()
    assert bare["logprob"] == pytest.approx(reference_score(tiny.model, ids), abs=1e-4)
    assert server.score(toks["ann"]).json()["logprob"] != pytest.approx(bare["logprob"], abs=1e-3)


def test_upload_replace_delete(server, two_users, tiny, tmp_path):
    toks, data = two_users
    store = server.router.store
    first = server.client.get("/v1/users/ann/adapter", headers=auth(toks["ann"])).json()
    assert first["sha256"] == wire.hashlib.sha256(data["ann"]).hexdigest() and first["method"] == "norm"
    assert first["meta"] == wire.parse_file(data["ann"], "upload")[1]  # the file's full metadata
    new = adapter_bytes(tiny, 7, tmp_path)
    assert server.score(toks["ann"]).status_code == 200  # the old adapter is now cached
    rec = server.put("ann", toks["ann"], new).json()
    assert rec["sha256"] != first["sha256"] and not store.path_of(first["sha256"]).exists()
    assert server.score(toks["ann"]).json()["logprob"] == pytest.approx(
        reference_score(alone(tiny, new), text_ids(tiny, TEXT)), abs=1e-4)
    r = server.client.delete("/v1/users/ann/adapter", headers=auth(toks["ann"]))
    assert r.status_code == 200 and r.json()["deleted"] == rec["sha256"]
    assert not store.path_of(rec["sha256"]).exists() and store.get("ann") is None
    assert server.score(toks["ann"]).status_code == 404
    assert server.client.delete("/v1/users/ann/adapter", headers=auth(toks["ann"])).status_code == 404
    assert server.client.delete("/v1/users/bob/adapter", headers=auth(ADMIN)).status_code == 200  # revocation


def _malformed(tiny, tmp_path, kind):
    good = adapter_bytes(tiny, 3, tmp_path)
    tensors, meta = wire.parse_file(good, "good")
    flat = tensors["adapter"]
    if kind == "random bytes":
        return torch.randint(0, 256, (900,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes()
    if kind == "truncated":
        return good[:-17]
    if kind == "wrong shapes":
        return raw_adapter(flat[:-64], {**meta, "params": flat.numel() - 64, "shapes": meta["shapes"][:-1],
                                        "layout": wire.layout_hash([("x.weight", (64,))] * 4)})
    if kind == "NaN":
        return raw_adapter(torch.cat([flat[:-1], torch.tensor([float("nan")], dtype=flat.dtype)]), meta)
    if kind == "wrong base":
        other = tiny_model(seed=1)
        return adapter_bytes(Base(other, tiny.tokenizer, fingerprint_model(other), "tiny-1"), 3, tmp_path)
    if kind == "steer method":
        return adapter_bytes(tiny, 3, tmp_path, method="steer")
    if kind == "lora rank 32":
        from sharedllm.adapters.lora import LoraConfig
        from sharedllm.personalise import new_adapter, save_adapted

        adapted = new_adapter(tiny, "lora", config=LoraConfig(rank=32, alpha=64))
        save_adapted(adapted, tmp_path / "r32.safetensors", tiny)
        return (tmp_path / "r32.safetensors").read_bytes()
    if kind == "oversized":
        return good + b"\0" * (2 << 20)
    raise ValueError(kind)


@pytest.mark.parametrize("kind, status, needle", [
    ("random bytes", 400, "not a safetensors"), ("truncated", 400, "truncated"),
    ("wrong shapes", 400, "shapes do not match"), ("NaN", 400, "non-finite"), ("wrong base", 400, "exact base"),
    ("steer method", 400, "refused"), ("lora rank 32", 400, "largest served rank"), ("oversized", 413, "limit"),
])
def test_malformed_uploads_are_refused_and_leave_the_store_unchanged(server, two_users, tiny, tmp_path, kind,
                                                                      status, needle):
    toks, _ = two_users
    store = server.router.store
    before = (store.check(), store.get("ann"), sorted(p.name for p in store.files.rglob("*")))
    r = server.put("ann", toks["ann"], _malformed(tiny, tmp_path, kind))
    assert r.status_code == status and needle in r.json()["detail"], r.text
    assert (store.check(), store.get("ann"), sorted(p.name for p in store.files.rglob("*"))) == before
    # the refused upload for a user with no adapter leaves them with none
    assert server.put("cy", toks["cy"], _malformed(tiny, tmp_path, kind)).status_code == status
    assert store.get("cy") is None


def test_restart_keeps_users_tokens_and_adapters(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "store")
    token = s.user("ann")
    data = adapter_bytes(tiny, 5, tmp_path)
    sha = s.put("ann", token, data).json()["sha256"]
    before = s.score(token).json()
    s.close()
    s = Server(tiny, tmp_path / "store")
    assert s.client.get("/v1/users/ann/adapter", headers=auth(token)).json()["sha256"] == sha
    assert s.score(token).json()["logprob"] == pytest.approx(before["logprob"], abs=1e-6)
    assert s.router.stats()["cache_misses"] == 1  # decoded from disk after the restart
    s.close()


def test_completions_are_openai_shaped_and_greedy_matches_the_user_alone(server, two_users, tiny):
    toks, data = two_users
    r = server.client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 6, "temperature": 0},
                           headers=auth(toks["bob"])).json()
    prompt = text_ids(tiny, "the cat")
    ref = alone(tiny, data["bob"]).generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                                            do_sample=False)[0, len(prompt):].tolist()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == tiny.tokenizer.decode(ref)
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}
    assert r["choices"][0]["finish_reason"] == "length"
    too_long = server.client.post("/v1/completions", json={"prompt": "x" * 1020, "max_tokens": 10},
                                  headers=auth(toks["bob"]))
    assert too_long.status_code == 400 and "context" in too_long.json()["detail"]


def test_concurrent_requests_of_different_users_share_a_batch_and_each_gets_its_own_result(tiny, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "store", window_s=0.5, max_batch=4)
    users = ["u0", "u1", "u2", "u3"]
    toks = {u: s.user(u) for u in users}
    data = {u: adapter_bytes(tiny, i, tmp_path) for i, u in enumerate(users)}
    for u in users:
        s.put(u, toks[u], data[u])
    texts = {u: TEXT[: 12 + 7 * i] for i, u in enumerate(users)}  # different lengths: padding in the batch
    out = {}

    def ask(u):
        out[u] = s.score(toks[u], text=texts[u]).json()

    threads = [threading.Thread(target=ask, args=(u,)) for u in users]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert s.router.stats()["largest_batch"] >= 2
    for u in users:
        assert out[u]["logprob"] == pytest.approx(reference_score(alone(tiny, data[u]), text_ids(tiny, texts[u])),
                                                  abs=1e-4)
    s.close()


@pytest.mark.parametrize("scheme", ["int8", "int8-channel", "int8-delta"])
def test_int8_adapters_are_served_like_the_cli_loads_them(server, tiny, tmp_path, scheme):
    from sharedllm.quant.compress import encoded

    token = server.user("ann")
    raw = adapter_bytes(tiny, 9, tmp_path)
    tensors, meta = wire.parse_file(raw, "raw")
    layout = [(n, tuple(s)) for n, s in zip(server.router.model.norm_names, meta["shapes"])]
    data = encoded(tensors["adapter"].float(), layout, dict(tiny.model.named_parameters()), meta, scheme)
    r = server.put("ann", token, data)
    assert r.status_code == 200 and r.json()["scheme"] == scheme, r.text
    got = server.score(token).json()["logprob"]
    assert got == pytest.approx(reference_score(alone(tiny, data), text_ids(tiny, TEXT)), abs=1e-4)
