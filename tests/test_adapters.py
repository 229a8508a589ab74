"""One battery over every registered adapter method (the PEFT-style test matrix)."""
import pytest
import torch

from sharedllm import wire
from sharedllm.adapters import METHODS
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, personalise, save_adapted
from sharedllm.train import TrainConfig

CASES = sorted(METHODS)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def _trained(tiny, method):
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))
    return personalise(tiny, tokens, method, TrainConfig(steps=3, batch=2, seq=32, lr=1e-2))


def test_registry_has_the_five_methods():
    assert set(CASES) == {"norm", "lora", "ia3", "full", "steer", "vera", "loraxs", "road"}


@pytest.mark.parametrize("method", CASES)
def test_untrained_adapter_reproduces_base_logits_exactly(tiny, ids, method):
    adapted = new_adapter(tiny, method)
    assert torch.equal(_logits(adapted.model, ids), _logits(tiny.model, ids))


@pytest.mark.parametrize("method", CASES)
def test_only_adapter_params_change(tiny, method):
    before = {n: p.clone() for n, p in tiny.model.state_dict().items()}
    adapted = _trained(tiny, method)
    assert all(torch.equal(before[n], p) for n, p in tiny.model.state_dict().items()), "base was modified"
    trained = {id(p) for p in adapted.params.values()}
    changed = [n for n, p in adapted.model.named_parameters() if id(p) in trained and p.requires_grad]
    assert changed, "adapter has no trainable parameters"
    checked = 0
    for n, p in adapted.model.named_parameters():
        key = n.removeprefix("base_model.model.").replace(".base_layer", "")
        if id(p) not in trained:
            assert torch.equal(p, before[key]), f"{n} changed but is not in the adapter"
            checked += 1
    assert checked > 0 or method == "full"
    assert any(not torch.equal(p, before.get(n, torch.zeros_like(p))) for n, p in adapted.params.items())


def test_norm_trains_exactly_the_rmsnorm_gains(tiny):
    params = new_adapter(tiny, "norm").params
    assert len(params) == 2 * 2 + 1 and all(n.endswith("norm.weight") for n in params)
    assert sum(p.numel() for p in params.values()) == 5 * 64


@pytest.mark.parametrize("method", CASES)
def test_save_load_is_exact(tiny, ids, method, tmp_path):
    adapted = _trained(tiny, method)
    path = save_adapted(adapted, tmp_path / "a.safetensors", tiny, dtype=torch.float32)
    loaded = load_adapted(tiny, path)
    assert loaded.method == method
    for n, p in adapted.params.items():
        assert torch.equal(loaded.params[n], p)
    assert torch.equal(_logits(loaded.model, ids), _logits(adapted.model, ids))


@pytest.mark.parametrize("method", CASES)
def test_fp16_file_is_two_bytes_per_param_plus_small_header(tiny, method, tmp_path):
    adapted = new_adapter(tiny, method)
    path = save_adapted(adapted, tmp_path / "a.safetensors", tiny)
    assert path.stat().st_size <= 2 * adapted.n_params + 1024


def _resave(path, tensors=None, meta_patch=None):
    t, meta = wire.read_file(path)
    data = wire.adapter_bytes(tensors or t, {**meta, **(meta_patch or {})})
    path.write_bytes(data)


@pytest.mark.parametrize("method", CASES)
def test_refusals(tiny, method, tmp_path):
    path = save_adapted(new_adapter(tiny, method), tmp_path / "a.safetensors", tiny)
    good = path.read_bytes()
    cases = {
        "trained on base": lambda: _resave(path, meta_patch={"base_fingerprint": "0" * 64}),
        "names or shapes": lambda: _resave(path, meta_patch={"layout": "deadbeef"}),
        "non-finite": lambda: _resave(path, tensors={"adapter": torch.full_like(wire.read_file(path)[0]["adapter"],
                                                                               float("nan"))}),
        "not a safetensors": lambda: path.write_bytes(b"\x80\x04\x95pickle-bytes" * 10),
        "truncated": lambda: path.write_bytes(good[:-7]),
    }
    for needle, corrupt in cases.items():
        path.write_bytes(good)
        corrupt()
        with pytest.raises(SharedLLMError, match=needle):
            load_adapted(tiny, path)


def test_wrong_length_tensor_is_refused(tiny, tmp_path):
    path = save_adapted(new_adapter(tiny, "norm"), tmp_path / "a.safetensors", tiny)
    _resave(path, tensors={"adapter": torch.zeros(7, dtype=torch.float16)})
    with pytest.raises(SharedLLMError, match="needs F16 \\[320\\]"):
        load_adapted(tiny, path)


def test_adapter_on_another_base_is_refused(tiny, tmp_path):
    from sharedllm.arch import Base, fingerprint_model
    from sharedllm.base import tiny_model

    other = tiny_model(seed=1)
    other_base = Base(model=other, tokenizer=tiny.tokenizer, fingerprint=fingerprint_model(other), name="tiny-1")
    path = save_adapted(new_adapter(tiny, "norm"), tmp_path / "a.safetensors", tiny)
    with pytest.raises(SharedLLMError, match=other_base.fingerprint[:16]):
        load_adapted(other_base, path)


def test_training_is_reproducible_and_budget_stops(tiny):
    a, b = _trained(tiny, "norm"), _trained(tiny, "norm")
    assert a.result.losses == b.result.losses
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))
    timed = personalise(tiny, tokens, "norm", TrainConfig(steps=10_000, batch=1, seq=16, budget_s=0.0))
    assert timed.result.steps == 0


@pytest.mark.parametrize("method", CASES)
def test_frozen_weights_are_shared_with_the_base_and_trained_ones_are_private(tiny, method):
    adapted = new_adapter(tiny, method)
    base_ptrs = {p.data_ptr() for p in tiny.model.parameters()}
    trained = {p.data_ptr() for p in adapted.params.values()}
    assert not trained & base_ptrs, "an adapter parameter aliases the base: training would modify the base"
    frozen = [p for p in adapted.model.parameters() if p.data_ptr() not in trained]
    assert all(not p.requires_grad for p in frozen)
    if method != "full":
        assert frozen and all(p.data_ptr() in base_ptrs for p in frozen), "frozen weights were copied"
    else:
        model = adapted.model
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "tie was broken"


def test_an_adapter_depends_on_its_seed_not_on_what_ran_before(tiny):
    """LoRA's random init is drawn under the training seed: units run in any order (or on any Ray worker) agree."""
    import torch

    from sharedllm.personalise import personalise
    from sharedllm.train import TrainConfig

    toks, cfg = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(1)), TrainConfig(
        steps=2, batch=2, seq=32, seed=3)
    first = personalise(tiny, toks, "lora", cfg)
    torch.randn(1000)  # the process's global RNG moves on, as it does between units
    second = personalise(tiny, toks, "lora", cfg)
    assert all(torch.equal(first.params[k], second.params[k]) for k in first.params)
    other = personalise(tiny, toks, "lora", TrainConfig(steps=2, batch=2, seq=32, seed=4))
    assert not all(torch.equal(first.params[k], other.params[k]) for k in first.params)


def test_adapted_copies_share_the_frozen_base_and_never_write_it(tiny):
    """norm / lora / steer copies share every tensor they do not train with the base (memory: one base, not one per
    adapter); training them leaves the base bit-identical. Full fine-tuning copies everything."""
    import torch

    from sharedllm.adapters import adapted_model, get_method
    from sharedllm.arch import fingerprint_model
    from sharedllm.personalise import personalise
    from sharedllm.train import TrainConfig

    before = fingerprint_model(tiny.model)
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q, base_gain = tiny.model.state_dict()[q], tiny.model.model.norm.weight
    for method in ("norm", "lora", "steer", "full"):
        model, params = adapted_model(tiny.model, get_method(method))
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        shares = inner.get_parameter(q.removesuffix(".weight") + ".base_layer.weight"
                                     if method == "lora" else q).data_ptr() == base_q.data_ptr()
        assert shares == (method != "full"), method
        assert inner.model.norm.weight.data_ptr() != base_gain.data_ptr() or method in ("lora", "steer")
        toks = torch.randint(0, 200, (3000,), generator=torch.Generator().manual_seed(0))
        personalise(tiny, toks, method, TrainConfig(steps=2, batch=2, seq=32, lr=1e-2))
    assert fingerprint_model(tiny.model) == before
    assert not any(p.requires_grad for p in tiny.model.parameters())
