"""OpenAI-compatible chat and completions over a real loopback server: the official `openai` client, streaming
(SSE chunks, [DONE]), stop strings on the byte-tokenizer tiny base, disconnects, and /metrics."""
import json
import select
import socket
import time

import httpx
import pytest
import torch

from sharedllm.serve import build
from sharedllm.serve.hangup import POLLRDHUP, hung_up
from sharedllm.serve.oai import Message, chat_ids
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, LiveServer, adapter_bytes, alone

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a cat"}]


def auth(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oai")
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp / "store")
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        toks = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"]
                for u in ("ann", "bob", "cy")}
        data = {u: adapter_bytes(tiny, i + 20, tmp, scale=0.6) for i, u in enumerate(("ann", "bob"))}
        for u, d in data.items():
            assert c.put(f"/v1/users/{u}/adapter", content=d, headers=auth(toks[u])).status_code == 200
        yield srv, c, toks, data, router
    router.close()
    router.store.close()
    mp.undo()


def client(srv, token):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=token, max_retries=0)


def test_chat_with_the_official_client_is_the_users_own_greedy_continuation(live, tiny):
    srv, _, toks, data, router = live
    r = client(srv, toks["ann"]).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                                         temperature=0)
    prompt = chat_ids(router, [Message(**m) for m in MESSAGES])
    assert prompt[0] == tiny.tokenizer.bos_id and bytes(prompt[1:]).decode().endswith("<|assistant|>\n")
    ref = alone(tiny, data["ann"]).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                            eos_token_id=tiny.tokenizer.eos_id)[0, len(prompt):].tolist()
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == tiny.tokenizer.decode(ref)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref)
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    sampled = {u: client(srv, toks[u]).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                                               temperature=1.0, seed=1).choices[0].message.content
               for u in ("ann", "bob")}
    assert sampled["ann"] != sampled["bob"]  # same seed, each user's own gains


def test_streamed_chat_and_completions_equal_the_plain_answers(live):
    srv, _, toks, _, _ = live
    c = client(srv, toks["bob"])
    kw = dict(model="tiny", max_tokens=20, temperature=1.0, seed=5)
    plain = c.chat.completions.create(messages=MESSAGES, **kw)
    chunks = list(c.chat.completions.create(messages=MESSAGES, stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    plain = c.completions.create(prompt="the cat", **kw)
    streamed = list(c.completions.create(prompt="the cat", stream=True, **kw))
    assert "".join(s.choices[0].text for s in streamed) == plain.choices[0].text
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=auth(toks["bob"]),
                      json={"prompt": "the cat", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines) and json.loads(lines[0][6:])["object"] == "text_completion"


def _with_multibyte(c, token):
    """A sampled completion (seed found by search; deterministic) whose text holds a whole non-ASCII character
    followed by two characters that first occur there."""
    for seed in range(200):
        body = {"prompt": "caf", "max_tokens": 64, "temperature": 3.0, "seed": seed}
        text = c.post("/v1/completions", json=body, headers=auth(token)).json()["choices"][0]["text"]
        for i, ch in enumerate(text[:-2]):
            after = text[i + 1: i + 3]
            if ord(ch) > 127 and ch != "\ufffd" and "\ufffd" not in after and text.find(after) == i + 1:
                return body, text, i
    raise AssertionError("no sampled text with a multi-byte character")


def test_stop_strings_on_decoded_text_keep_multibyte_characters_whole(live):
    srv, c, toks, _, _ = live
    body, text, i = _with_multibyte(c, toks["ann"])
    stop = text[i + 1: i + 3]
    r = c.post("/v1/completions", json={**body, "stop": ["never-there", stop]}, headers=auth(toks["ann"])).json()
    assert r["choices"][0]["text"] == text[: i + 1] and r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"][-1] == text[i] and len(text[i].encode()) > 1  # the character is whole
    first = text.find(text[i])
    r = c.post("/v1/completions", json={**body, "stop": text[i]}, headers=auth(toks["ann"])).json()
    assert r["choices"][0]["text"] == text[:first]
    pieces = []
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=auth(toks["ann"]),
                      json={**body, "stop": [stop], "stream": True}) as s:
        for ln in s.iter_lines():
            if ln.startswith("data: {"):
                pieces.append(json.loads(ln[6:])["choices"][0]["text"])
    # a half character handed out early would show as U+FFFD where the final text has the whole character
    assert "".join(pieces) == text[: i + 1] and len(pieces) > 2


@pytest.mark.parametrize("who, body, status", [
    (None, {"messages": MESSAGES}, 401),
    ("admin", {"messages": MESSAGES}, 403),
    ("cy", {"messages": MESSAGES}, 404),
    ("ann", {"messages": MESSAGES, "user": "bob"}, 403),
    ("ann", {"messages": MESSAGES, "n": 2}, 422),
    ("ann", {"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 422),
    ("ann", {"messages": [{"role": "wizard", "content": "x"}]}, 422),
    ("ann", {"messages": []}, 422),
    ("ann", {"messages": [{"role": "user", "content": "x" * 1100}]}, 413),  # over the context in bytes, like a prompt
    ("ann", {"messages": MESSAGES, "max_tokens": 1024}, 400),
    ("cy", {"messages": MESSAGES, "adapter": "none", "max_tokens": 2}, 200),
])
def test_chat_refusals_are_clear_json(live, who, body, status):
    _, c, toks, _, _ = live
    token = {"admin": ADMIN, None: None}.get(who, toks.get(who))
    r = c.post("/v1/chat/completions", json=body, headers=auth(token) if token else {})
    assert r.status_code == status and isinstance(r.json(), dict), r.text


def test_a_disconnected_stream_frees_its_row_and_metrics_count_it(live):
    srv, c, toks, _, router = live
    assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=auth(toks["ann"])).status_code == 403
    assert c.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=auth(toks["cy"])).status_code == 404
    before = router.metrics.rows_dropped._value.get()
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=auth(toks["bob"]), timeout=60,
                      json={"prompt": "the cat", "max_tokens": 1000, "stream": True, "temperature": 0}) as s:
        next(s.iter_lines())  # the first chunk has arrived: the row is decoding; now hang up
    deadline = time.monotonic() + 120
    while router.stats()["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert router.stats()["active_rows"] == 0 and router.metrics.rows_dropped._value.get() == before + 1
    m = c.get("/metrics", headers=auth(ADMIN))
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'sharedllm_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'sharedllm_requests_total{endpoint="/v1/chat/completions",status="404"}' in text
    for name in ("sharedllm_queue_depth", "sharedllm_active_rows 0.0", "sharedllm_tokens_generated_total",
                 "sharedllm_time_to_first_token_seconds_bucket", "sharedllm_time_per_output_token_seconds_count",
                 "sharedllm_adapter_cache_hits_total", "sharedllm_store_adapters 2.0", "sharedllm_store_bytes"):
        assert name in text, name
    generated = float(text.split("\nsharedllm_tokens_generated_total ")[1].split()[0])
    assert 0 < generated and router.metrics.tokens_generated._value.get() == generated


def _until(cond, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.skipif(POLLRDHUP is None or not hasattr(select, "poll"), reason="needs poll + POLLRDHUP")
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_row_within_one_decode_step(live, stream):
    """A long completion (plain or streamed) on a raw socket; the client closes it mid-generation. Counted in decode
    steps, not seconds: once the close has reached the server's socket, the row leaves the batch before the
    engine starts another step (at most the step already running completes), its future is cancelled, its KV
    rows are gone, and the drop is counted in /metrics."""
    srv, c, toks, _, router = live
    engine = router.engine
    _until(lambda: router.stats()["active_rows"] == 0 and router.stats()["queued"] == 0)
    dropped = router.metrics.rows_dropped._value.get()
    body = json.dumps({"prompt": "the cat", "max_tokens": 1000, "stream": stream, "temperature": 0,
                       "adapter": "none"}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=120)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + toks["bob"].encode() + b"\r\nContent-Length: " +
                  str(len(body)).encode() + b"\r\n\r\n" + body)
        _until(lambda: len(engine.rows) == 1)
        job = list(engine.rows)[0].job
        if stream:  # the first chunk has arrived
            got = b""
            while b"data:" not in got:
                got += s.recv(4096)
        start = engine.steps
        _until(lambda: engine.steps >= start + 2)  # decoding
        assert job.conn is not None  # the app found the request's socket for the engine to poll
    finally:
        s.close()
    _until(lambda: hung_up([job.conn]) == [True])  # the hang-up has been delivered to the server's socket
    at_close = engine.steps
    _until(lambda: job.future.done() and job.drop_step is not None)
    assert job.future.cancelled() and job.drop_step <= at_close + 1
    assert router.stats()["cancel_lag_steps_max"] <= 1
    _until(lambda: router.stats()["active_rows"] == 0)
    assert len(engine.kv) == 0 and engine.kv.nbytes == 0
    assert router.metrics.rows_dropped._value.get() == dropped + 1
    m = c.get("/metrics", headers=auth(ADMIN)).text
    assert float(m.split("\nsharedllm_rows_dropped_total ")[1].split()[0]) == dropped + 1


def test_two_lora_users_and_a_norm_user_stream_at_once_each_with_their_own_adapter(tiny, tmp_path, monkeypatch):
    """Issue 30's "done when" on the tiny base: two LoRA users and one norm user on one server, streaming
    completions at the same time through the official client; each stream is that user's greedy continuation alone
    (PEFT's PeftModel for the LoRA users), and a base-only request in the same batches is the bare base's."""
    import concurrent.futures

    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp_path / "store")
    data = {"lee": adapter_bytes(tiny, 31, tmp_path, scale=0.2, method="lora"),
            "max": adapter_bytes(tiny, 32, tmp_path, scale=0.2, method="lora"),
            "nia": adapter_bytes(tiny, 33, tmp_path, scale=0.6)}
    prompt = "the cat sat"
    ids = [tiny.tokenizer.bos_id] + tiny.tokenizer.encode(prompt)
    try:
        with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
            toks = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"] for u in data}
            for u, d in data.items():
                r = c.put(f"/v1/users/{u}/adapter", content=d, headers=auth(toks[u]))
                assert r.status_code == 200, r.text

            def stream(user, extra=None):
                chunks = client(srv, toks[user]).completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                                                     temperature=0, stream=True, extra_body=extra)
                return "".join(ch.choices[0].text for ch in chunks)

            router.engine.window_s = 0.3  # the idle engine waits for the others: they share one batch
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futs = {u: pool.submit(stream, u) for u in data}
                futs["base"] = pool.submit(stream, "lee", {"adapter": "none"})
                got = {u: f.result(120) for u, f in futs.items()}
            assert router.stats()["largest_batch"] >= 2
            kinds = c.get("/v1/users/lee/adapter", headers=auth(toks["lee"])).json()
            assert kinds.get("method") == "lora", kinds
    finally:
        router.close()
        router.store.close()
    models = {u: alone(tiny, d) for u, d in data.items()}
    models["base"] = tiny.model
    for u, model in models.items():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        assert got[u] == tiny.tokenizer.decode(ref), u
    assert got["lee"] != got["base"] != got["max"] != got["lee"], got  # the check above can fail
