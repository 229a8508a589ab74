"""Every method that declares a per-row kernel is served: one user per method uploads through the HTTP API, and all of
them score and generate at the same time (sharing batches where they meet), each equal to its own model alone."""
import threading

import pytest
import torch

from sharedllm.adapters import METHODS

from .serve_kit import adapter_bytes, alone, reference_score, text_ids
from .test_serve import TEXT, auth, server  # noqa: F401  (the fixture)

SERVED = sorted(name for name, m in METHODS.items() if m.caps.rows is not None)


def test_the_served_methods_are_the_ones_with_a_row_kernel():
    assert {"norm", "lora", "ia3", "vera", "loraxs", "road"} <= set(SERVED)
    assert not {"full", "steer"} & set(SERVED)


def test_every_row_method_is_uploaded_scored_and_generated_in_one_batch(server, tiny, tmp_path):  # noqa: F811
    data = {m: adapter_bytes(tiny, i, tmp_path, scale=0.1, method=m) for i, m in enumerate(SERVED)}
    tokens = {m: server.user(f"u-{m}") for m in SERVED}
    for m in SERVED:
        r = server.put(f"u-{m}", tokens[m], data[m])
        assert r.status_code == 200 and r.json()["method"] == m, r.text
    ids = text_ids(tiny, TEXT)
    prompt = [256, *b"the cat"]
    models = {m: alone(tiny, data[m]) for m in SERVED}
    want_score = {m: reference_score(models[m], ids) for m in SERVED}
    with torch.no_grad():
        want_text = {m: models[m].generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                                           do_sample=False)[0, len(prompt):].tolist() for m in SERVED}
    got, errors = {}, []

    def ask(m):
        try:
            s = server.score(tokens[m])
            c = server.client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                            "ignore_eos": True, "logprobs": 0},
                                   headers=auth(tokens[m]))
            got[m] = (s.status_code, s.json(), c.status_code, c.json())
        except Exception as e:  # noqa: BLE001  (reported below, per method)
            errors.append((m, repr(e)))

    threads = [threading.Thread(target=ask, args=(m,)) for m in SERVED]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for m in SERVED:
        s_status, s, c_status, c = got[m]
        assert s_status == 200 and c_status == 200, (m, s, c)
        assert s["logprob"] == pytest.approx(want_score[m], abs=1e-4), m
        tokens_out = c["choices"][0]["logprobs"]["tokens"]
        assert len(tokens_out) == 6, m
        assert c["choices"][0]["text"] == tiny.tokenizer.decode(want_text[m]), m
    scores = [got[m][1]["logprob"] for m in SERVED]
    assert len({round(x, 3) for x in scores}) == len(SERVED)  # each row really ran its own adapter
