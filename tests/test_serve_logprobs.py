"""`logprobs` and `echo` on /v1/completions (OpenAI's legacy completions, as lm-evaluation-harness uses them) over a
real loopback server on the tiny base: per row under the user's own adapter (norm, LoRA, the bare base), in mixed
batches, plain and streamed, equal to /v1/score and to each user's model alone within 1e-4 nats per token."""
import json
import threading

import httpx
import pytest
import torch

from sharedllm.serve import build
from sharedllm.serve.logprobs import Offsets, TokenNames
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, LiveServer, adapter_bytes, alone, text_ids

TOL = 1e-4  # nats per token (issue 33)
TEXT = "the cat sat on the mat and then ran away"
USERS = ("ann", "lee", "cy")  # norm adapter, LoRA adapter, no adapter (the bare base with "adapter": "none")


def auth(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logprobs")
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp / "store")
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        toks = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"] for u in USERS}
        data = {"ann": adapter_bytes(tiny, 31, tmp, scale=0.6),
                "lee": adapter_bytes(tiny, 32, tmp, scale=0.6, method="lora")}
        for u, d in data.items():
            assert c.put(f"/v1/users/{u}/adapter", content=d, headers=auth(toks[u])).status_code == 200
        models = {u: alone(tiny, d) for u, d in data.items()}
        models["cy"] = tiny.model
        yield srv, c, toks, models, router
    router.close()
    router.store.close()
    mp.undo()


def body_for(user: str, **kw) -> dict:
    return {**kw, "adapter": "none"} if user == "cy" else kw


def complete(c, toks, user, **kw) -> dict:
    r = c.post("/v1/completions", json=body_for(user, **kw), headers=auth(toks[user]))
    assert r.status_code == 200, r.text
    return r.json()


@torch.no_grad()
def per_token(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, one sequence alone through the user's own model."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def close(got, want, tol=TOL):
    assert len(got) == len(want)
    worst = max((abs(a - b) for a, b in zip(got, want)), default=0.0)
    assert worst <= tol, worst


def check_top(lp: dict, k: int) -> None:
    """Each position's top_logprobs: best first, at most k + 1 entries (the chosen token is always there, as in
    OpenAI's API), the chosen token's entry equal to its logprob, the other k the most likely."""
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        if val is None:
            assert top is None
            continue
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True) and k <= len(top) <= k + 1
        assert tok in top and top[tok] == pytest.approx(val, abs=1e-6)
        if len(top) == k + 1:  # the chosen token was not among the k most likely: it comes last
            assert list(top)[-1] == tok and all(v >= val for v in vals[:-1])


@pytest.mark.parametrize("user", USERS)
def test_echo_with_max_tokens_0_scores_the_prompt_like_v1_score_and_the_users_model_alone(live, tiny, user):
    srv, c, toks, models, _ = live
    r = complete(c, toks, user, prompt=TEXT, max_tokens=0, echo=True, logprobs=3)
    ch = r["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == TEXT and ch["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    # the BOS the server puts before a text prompt is not echoed: every text token has its logprob given BOS
    assert lp["tokens"] == list(TEXT) and lp["text_offset"] == list(range(len(TEXT)))
    ids = text_ids(tiny, TEXT)
    close(lp["token_logprobs"], per_token(models[user], ids))
    score = c.post("/v1/score", json=body_for(user, text=TEXT), headers=auth(toks[user])).json()
    assert score["tokens"] == len(lp["tokens"])
    assert abs(sum(lp["token_logprobs"]) - score["logprob"]) <= TOL * score["tokens"]
    check_top(lp, 3)
    # a token-id prompt is run as given: here with the BOS, which is echoed with no logprob (nothing precedes it)
    by_ids = complete(c, toks, user, prompt=ids, max_tokens=0, echo=True, logprobs=3)["choices"][0]
    assert by_ids["text"] == TEXT and by_ids["logprobs"]["tokens"] == ["<bos>"] + list(TEXT)
    assert by_ids["logprobs"]["token_logprobs"][0] is None and by_ids["logprobs"]["top_logprobs"][0] is None
    assert by_ids["logprobs"]["token_logprobs"][1:] == lp["token_logprobs"]


def test_a_lora_users_logprobs_differ_from_the_base_and_a_norm_users(live):
    _, c, toks, _, _ = live
    got = {u: complete(c, toks, u, prompt=TEXT, max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]
           for u in USERS}
    for a, b in (("lee", "cy"), ("lee", "ann"), ("ann", "cy")):
        assert max(abs(x - y) for x, y in zip(got[a]["token_logprobs"], got[b]["token_logprobs"])) > 1e-2
    assert all(len(t) == 1 for t in got["lee"]["top_logprobs"])  # logprobs 0: the chosen token only


@pytest.mark.parametrize("user", ("lee", "ann"))
def test_generated_tokens_logprobs_are_the_models_own_distribution(live, tiny, user):
    srv, c, toks, models, _ = live
    prompt = "the cat"
    ids = text_ids(tiny, prompt)
    greedy = complete(c, toks, user, prompt=prompt, max_tokens=12, temperature=0, logprobs=5)["choices"][0]
    lp = greedy["logprobs"]
    gen = [ids_of(tiny, t) for t in lp["tokens"]]
    assert len(gen) == 12 or greedy["finish_reason"] == "stop"
    close(lp["token_logprobs"], per_token(models[user], ids + gen)[len(ids) - 1:])
    check_top(lp, 5)
    assert all(next(iter(top)) == tok for tok, top in zip(lp["tokens"], lp["top_logprobs"]))  # greedy = top 1
    # the same text through the score path (echo of prompt + completion as token ids) gives the same numbers
    echo = complete(c, toks, user, prompt=ids + gen, max_tokens=0, echo=True, logprobs=5)["choices"][0]["logprobs"]
    close(lp["token_logprobs"], echo["token_logprobs"][len(ids):])
    assert lp["top_logprobs"][0].keys() == echo["top_logprobs"][len(ids)].keys()
    # sampled at temperature 2: still the model's own logprobs (before temperature), as OpenAI reports them
    hot = complete(c, toks, user, prompt=prompt, max_tokens=12, temperature=2.0, seed=3, logprobs=2)["choices"][0]
    gen = [ids_of(tiny, t) for t in hot["logprobs"]["tokens"]]
    close(hot["logprobs"]["token_logprobs"], per_token(models[user], ids + gen)[len(ids) - 1:])
    assert hot["logprobs"]["text_offset"][0] == 0


def ids_of(tiny, name: str) -> int:
    if name.startswith("bytes:"):
        return int(name[len("bytes:\\x"):], 16)
    return {"<bos>": tiny.tokenizer.bos_id, "<eos>": tiny.tokenizer.eos_id}.get(name) or ord(name)


def test_echo_with_generation_and_the_payload_lm_eval_sends(live, tiny):
    """lm-eval's local-completions loglikelihood request: token ids, echo, max_tokens 1, logprobs 1; it sums
    token_logprobs[ctxlen:-1] and calls the continuation greedy when each is the max of its top_logprobs."""
    _, c, toks, models, _ = live
    ctx, cont = text_ids(tiny, "the cat sat on"), tiny.tokenizer.encode(" the mat")
    payload = {"model": "tiny", "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    r = complete(c, toks, "lee", **payload)
    (ch,) = r["choices"]
    lp = ch["logprobs"]
    assert ch["index"] == 0 and len(lp["tokens"]) == len(ctx + cont) + 1
    assert ch["text"].startswith("the cat sat on the mat") and r["usage"]["completion_tokens"] == 1
    want = per_token(models["lee"], ctx + cont)[len(ctx) - 1:]
    assert abs(sum(lp["token_logprobs"][len(ctx):-1]) - sum(want)) <= TOL * len(want)
    assert all(t != max(top.values()) or t == top[n] for n, t, top in
               zip(lp["tokens"][len(ctx):-1], lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]))


def test_lm_evals_own_local_completions_client_reads_the_answers(live, tiny):
    """lm-eval 0.4's `local-completions` payloads and parsers (the `eval` extra; skipped without it)."""
    api = pytest.importorskip("lm_eval.models.openai_completions")
    srv, c, toks, models, _ = live
    try:
        lm = api.LocalCompletionsAPI(base_url=f"{srv.url}/v1/completions", tokenizer_backend=None, model="tiny")
    except ModuleNotFoundError as e:  # lm-eval without its `api` extra
        pytest.skip(str(e))
    ctx, cont = text_ids(tiny, "the cat sat on"), tiny.tokenizer.encode(" the mat")
    r = c.post("/v1/completions", json=lm._create_payload([ctx + cont], generate=False), headers=auth(toks["lee"]))
    ((ll, greedy),) = api.LocalCompletionsAPI.parse_logprobs(r.json(), ctxlens=[len(ctx)])
    want = per_token(models["lee"], ctx + cont)[len(ctx) - 1:]
    assert abs(ll - sum(want)) <= TOL * len(want) and isinstance(greedy, bool)
    gen = lm._create_payload([ctx], generate=True, gen_kwargs={"until": ["\n"], "max_gen_toks": 8}, eos="x")
    r = c.post("/v1/completions", json=gen, headers=auth(toks["lee"]))
    (text,) = api.LocalCompletionsAPI.parse_generations(r.json())
    ours = complete(c, toks, "lee", prompt=ctx, max_tokens=8, temperature=0, stop=["\n", "x"])["choices"][0]["text"]
    assert text == ours


def test_several_prompts_are_several_choices_each_its_own(live):
    _, c, toks, _, _ = live
    prompts = ["the cat", "a dog ran", "then"]
    many = complete(c, toks, "ann", prompt=prompts, max_tokens=5, temperature=0, echo=True, logprobs=2)
    assert [ch["index"] for ch in many["choices"]] == [0, 1, 2]
    for p, ch in zip(prompts, many["choices"]):
        one = complete(c, toks, "ann", prompt=p, max_tokens=5, temperature=0, echo=True, logprobs=2)["choices"][0]
        assert ch["text"] == one["text"] and ch["logprobs"]["tokens"] == one["logprobs"]["tokens"]
        close(ch["logprobs"]["token_logprobs"][1:], one["logprobs"]["token_logprobs"][1:])
    assert many["usage"]["completion_tokens"] == sum(len(ch["logprobs"]["tokens"]) - len(p)
                                                     for p, ch in zip(prompts, many["choices"]))


def test_mixed_user_batches_give_each_row_its_own_logprobs(live, tiny):
    """Norm, LoRA and base-only rows at once (the idle engine waits for them: one prefill, shared decode steps and
    score batches), each equal to its own model alone."""
    _, c, toks, models, router = live
    prompts = {"ann": "the quick brown", "lee": "a mat and", "cy": "then ran"}
    results = {}

    def go(u):
        results[u] = complete(c, toks, u, prompt=prompts[u], max_tokens=8, temperature=0, echo=True, logprobs=2)

    before, window = router.engine.stats()["largest_batch"], router.engine.window_s
    router.engine.window_s = 0.3
    try:
        threads = [threading.Thread(target=go, args=(u,)) for u in USERS for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        router.engine.window_s = window
    assert router.engine.stats()["largest_batch"] >= max(before, 3)
    for u in USERS:
        lp = results[u]["choices"][0]["logprobs"]
        ids = [tiny.tokenizer.bos_id] + [ids_of(tiny, t) for t in lp["tokens"]]
        close(lp["token_logprobs"], per_token(models[u], ids))


def events(srv, token, body) -> list[dict]:
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers=auth(token), json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


@pytest.mark.parametrize("echo", (False, True))
def test_streamed_chunks_carry_the_same_logprobs(live, echo):
    srv, c, toks, _, _ = live
    body = {"prompt": "the cat", "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": echo,
            "stop": ["zzz"], "adapter": "none"}
    plain = complete(c, toks, "cy", **body)["choices"][0]
    chunks = [e["choices"][0] for e in events(srv, toks["cy"], {**body, "stream": True})]
    assert "".join(ch["text"] for ch in chunks) == plain["text"]
    got = {key: [] for key in plain["logprobs"]}
    for ch in chunks:
        if ch["logprobs"] is not None:
            for key in got:
                got[key] += ch["logprobs"][key]
    assert got == plain["logprobs"]
    assert sum(ch["logprobs"] is not None for ch in chunks) >= 5  # token by token, not one chunk at the end
    assert chunks[-1]["finish_reason"] == plain["finish_reason"]


def test_streamed_echo_only_and_several_prompts(live):
    srv, c, toks, _, _ = live
    body = {"prompt": ["the cat", "a dog"], "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    evs = events(srv, toks["ann"], body)
    assert evs[-1]["usage"]["completion_tokens"] == 0 and evs[-1]["usage"]["prompt_tokens"] == 2 * 1 + 7 + 5
    chunks = [e["choices"][0] for e in evs[:-1]]
    assert [(ch["index"], ch["text"], ch["finish_reason"]) for ch in chunks] == [
        (0, "the cat", None), (0, "", "length"), (1, "a dog", None), (1, "", "length")]
    assert chunks[0]["logprobs"]["tokens"] == list("the cat")


def test_the_openai_client_reads_logprobs(live):
    openai = pytest.importorskip("openai")
    srv, _, toks, _, _ = live
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=toks["lee"], max_retries=0)
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert lp.tokens[:7] == list("the cat") and len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset)
    streamed = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0,
                                              logprobs=2, stream=True))
    assert sum(len(s.choices[0].logprobs.tokens) for s in streamed if s.choices[0].logprobs) == len(lp.tokens) - 7


@pytest.mark.parametrize("body, status", [
    ({"logprobs": 6}, 422), ({"logprobs": -1}, 422), ({"logprobs": "1"}, 422), ({"logprobs": 1.0}, 422),
    ({"logprobs": True}, 422), ({"echo": "true"}, 422), ({"echo": 1}, 422), ({"echo": None}, 422),
    ({"max_tokens": 0}, 422), ({"max_tokens": -1}, 422), ({"prompt": []}, 422), ({"prompt": [[]]}, 422),
    ({"prompt": [1, "a"]}, 422), ({"prompt": [[1], "a"]}, 422), ({"prompt": ["a"] * 17}, 422),
    ({"prompt": [1.0]}, 422), ({"prompt": [True]}, 422), ({"prompt": [258]}, 400), ({"prompt": [[-1]]}, 400),
    ({"prompt": [104, 105], "max_tokens": 0, "echo": True, "logprobs": 5}, 200),
    ({"prompt": "", "max_tokens": 0, "echo": True, "logprobs": 1}, 200),
])
def test_refusals_are_strict(live, body, status):
    _, c, toks, _, _ = live
    r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body}, headers=auth(toks["ann"]))
    assert r.status_code == status, r.text
    if status == 200 and body.get("prompt") == "":
        assert r.json()["choices"][0]["logprobs"]["tokens"] == []  # only the (not echoed) BOS


def test_token_names_and_offsets_on_multibyte_text(tiny):
    names = TokenNames(tiny.tokenizer)
    ids = tiny.tokenizer.encode("café!")
    assert [names(i) for i in ids] == ["c", "a", "f", "bytes:\\xc3", "bytes:\\xa9", "!"]
    off = Offsets(tiny.tokenizer.decode)
    assert [off.push(i) for i in ids] == [0, 1, 2, 3, 3, 4]


@pytest.mark.slow
def test_token_names_on_the_default_bases_byte_level_tokenizer():
    from sharedllm.base import load_base

    tok = load_base("default").tokenizer
    names = TokenNames(tok)
    text = "naïve 😀 café\n\tdef f(x):"
    ids = tok.encode(text)

    def raw(name: str) -> bytes:
        return bytes(int(h, 16) for h in name[len("bytes:\\x"):].split("\\x")) if name.startswith("bytes:") \
            else name.encode()

    assert b"".join(raw(names(i)) for i in ids) == text.encode()  # a partial character is named by its bytes
    assert any(names(i).startswith("bytes:") for i in ids) and names(tok.eos_id) == "<|im_end|>"
    off = Offsets(tok.decode)
    assert [off.push(i) for i in ids] == [0, 2, 5, 5, 7, 12, 13, 14, 17, 19, 20, 21]  # 😀 starts at its first token
