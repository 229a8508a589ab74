"""sharedllm's own code paths call no deprecated API of the installed transformers / peft / torch: training two
steps, scoring, saving, loading and generating with every adapter method on the tiny base, and a completion through
the server, raise no FutureWarning / DeprecationWarning while a sharedllm frame is on the stack (issue 33, item 5).

Each case records every warning (`always`, so none is hidden by an earlier one at the same place), keeps those of a
deprecation category whose stack, at the moment of the warning, passes through the sharedllm package, and names
the sharedllm frames nearest to the warning: where the call to change is (sharedllm.compat has the version-proof
spellings).
"""
from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch

import sharedllm
from sharedllm.compat import cache_kwarg, cache_kwargs, quiet_peft_checkpointing_probe

PACKAGE = str(Path(sharedllm.__file__).resolve().parent)
DEPRECATIONS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def deprecations_from_sharedllm(fn) -> list[str]:
    seen = []

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, DEPRECATIONS):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if str(Path(f.filename).resolve()).startswith(PACKAGE)]
        if ours:
            via = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(ours[-3:]))
            seen.append(f"{category.__name__}: {message} [{filename}:{lineno}, via {via}]")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # catch_warnings puts the original back
        fn()
    return seen


def train_score_save_load_generate(tiny, method, tmp_path):
    from sharedllm.personalise import evaluate_on, load_adapted, personalise, save_adapted
    from sharedllm.train import TrainConfig

    toks = torch.tensor(tiny.tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 40))
    adapted = personalise(tiny, toks, method, TrainConfig(steps=2, batch=2, seq=32))
    evaluate_on(adapted.model, tiny, toks, 32, 128)
    path = save_adapted(adapted, tmp_path / f"{method}.safetensors", tiny)
    loaded = load_adapted(tiny, path)
    loaded.model.generate(toks[None, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("method", ["norm", "lora", "ia3", "full", "steer", "vera", "loraxs", "road"])
def test_training_and_generating_raise_no_deprecation(tiny, method, tmp_path):
    found = deprecations_from_sharedllm(lambda: train_score_save_load_generate(tiny, method, tmp_path))
    assert not found, "\n".join(found)


def test_a_completion_through_the_server_raises_no_deprecation(tiny, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from sharedllm.serve import build
    from sharedllm.store import ADMIN_ENV

    from .serve_kit import ADMIN, adapter_bytes

    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp_path / "store")
    data = adapter_bytes(tiny, 3, tmp_path, scale=0.3)

    def complete():
        with TestClient(app) as c:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            token = c.post("/v1/users", json={"user": "ann"}, headers=admin).json()["token"]
            me = {"Authorization": f"Bearer {token}"}
            assert c.put("/v1/users/ann/adapter", content=data, headers=me).status_code == 200
            r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 4, "temperature": 0},
                       headers=me)
            assert r.status_code == 200, r.text

    try:
        found = deprecations_from_sharedllm(complete)
    finally:
        router.close()
        router.store.close()
    assert not found, "\n".join(found)


def test_the_cache_argument_is_the_one_the_installed_transformers_takes(tiny):
    import inspect

    from transformers import DynamicCache

    name = cache_kwarg(tiny.model)
    assert name in inspect.signature(type(tiny.model).forward).parameters
    assert cache_kwarg() == name  # a **kwargs wrapper gets Llama's spelling
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        whole = tiny.model(input_ids=ids).logits[:, -1]
        cache = DynamicCache()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            tiny.model(input_ids=ids[:, :-1], use_cache=True, **cache_kwargs(tiny.model, cache))
            step = tiny.model(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(tiny.model, cache)).logits[:, -1]
    assert torch.allclose(step, whole, atol=1e-5)


def test_the_peft_probe_warning_is_silenced_and_nothing_else(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    def build():
        get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=2, target_modules=["q_proj"]))

    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        build()
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        with quiet_peft_checkpointing_probe():
            build()
            warnings.warn("another FutureWarning", FutureWarning)
    probe = lambda ws: [w for w in ws if "is_gradient_checkpointing" in str(w.message)]  # noqa: E731
    others = lambda ws: sorted(str(w.message) for w in ws if w not in probe(ws))  # noqa: E731
    assert not probe(quiet) and others(quiet) == sorted(others(loud) + ["another FutureWarning"])
