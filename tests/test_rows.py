"""Any adapter, per row: base-only, norm and LoRA rows in one batch each get exactly what they get alone.

The references are each user's own model: PEFT's own `PeftModel` for LoRA (`load_adapted` attaches it), the
single-user model for norm, the bare base for base-only rows."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sharedllm.adapters import METHODS
from sharedllm.adapters.rows import RowModel
from sharedllm.fleet import train_fleet
from sharedllm.personalise import load_adapted, personalise
from sharedllm.serve.compute import decode_step, prefill, score_batch
from sharedllm.serve.fastdecode import LeanDecoder
from sharedllm.serve.kv import BatchCache
from sharedllm.serve.scheduler import Engine, Job
from sharedllm.train import TrainConfig

from .serve_kit import adapter_bytes
from .test_serve_fastdecode import tiny_qwen2

TOL = 1e-5  # fp32 logits, mixed batch vs the row alone
PROMPTS = [[256, *b"the cat sat on the mat"], [256, *b"abc"], [256, *b"a quick brown fox"], [256, *b"hello there"],
           [256, *b"x"], [256, *b"one more row"], [256, *b"and a seventh"], [256, *b"8th"]]


@pytest.fixture(params=["llama", "qwen2"])
def base(request, tiny):
    return tiny if request.param == "llama" else tiny_qwen2()


def _users(base, tmp_path):
    """[None (the bare base), a norm user, two LoRA users, an (IA)^3 user, a VeRA user, a LoRA-XS user, a RoAd
    user], each LoRA with non-zero A and B. A new per-row method adds its row here."""
    norm = load_adapted(base, data=adapter_bytes(base, 1, tmp_path), source="norm")
    loras = [load_adapted(base, data=adapter_bytes(base, s, tmp_path, scale=0.2, method="lora"), source=f"lora{s}")
             for s in (2, 3)]
    ia3 = load_adapted(base, data=adapter_bytes(base, 4, tmp_path, scale=0.3, method="ia3"), source="ia3")
    vera = load_adapted(base, data=adapter_bytes(base, 5, tmp_path, scale=0.3, method="vera"), source="vera")
    xs = load_adapted(base, data=adapter_bytes(base, 6, tmp_path, scale=0.05, method="loraxs"), source="loraxs")
    road = load_adapted(base, data=adapter_bytes(base, 7, tmp_path, scale=0.3, method="road"), source="road")
    return [None, norm, *loras, ia3, vera, xs, road]


def _state(rm, adapted):
    if adapted is None:
        return rm.base_row
    return rm.row({n: p.detach() for n, p in adapted.params.items()}, adapted.method, adapted.config)


def _alone_model(base, adapted):
    return base.model if adapted is None else adapted.model


@torch.no_grad()
def _alone_logits(base, adapted, ids):
    return _alone_model(base, adapted)(input_ids=torch.tensor([ids])).logits[0]


def test_the_lora_kernel_changes_what_it_should(base, tmp_path):
    """The checks below can fail: a LoRA row differs from the base and from the other LoRA user."""
    users = _users(base, tmp_path)
    ids = PROMPTS[0]
    a, b, c, *others = (_alone_logits(base, u, ids) for u in (None, *users[2:]))
    assert (a - b).abs().max() > 1e-2 and (b - c).abs().max() > 1e-2
    assert all((a - d).abs().max() > 1e-2 for d in others)


def test_a_mixed_batch_of_base_norm_and_lora_rows_equals_each_row_alone(base, tmp_path):
    users = _users(base, tmp_path) * 2  # every kind twice, different prompts
    rm = RowModel(base)
    rows = [PROMPTS[i % len(PROMPTS)] for i in range(len(users))]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    logits = rm.forward(ids, [_state(rm, u) for u in users]).logits
    for b, (u, r) in enumerate(zip(users, rows)):
        assert (logits[b, :len(r)] - _alone_logits(base, u, r)).abs().max() < TOL, b


def test_scores_in_a_mixed_batch_equal_each_row_alone(base, tmp_path):
    users = _users(base, tmp_path)
    rm = RowModel(base)
    mixed = score_batch(rm, PROMPTS[:len(users)], [_state(rm, u) for u in users])
    for u, p, got in zip(users, PROMPTS, mixed):
        logp = torch.log_softmax(_alone_logits(base, u, p)[:-1], -1).gather(1, torch.tensor(p[1:])[:, None]).sum()
        assert abs(got.logprob - logp.item()) / got.tokens < 1e-6


@pytest.mark.parametrize("lean", [True, False])
def test_decode_steps_of_mixed_rows_equal_each_row_alone(base, tmp_path, lean):
    """Prefill (HF path) then 4 decode steps (lean step or HF forward), every row's logits vs the row alone."""
    users = _users(base, tmp_path)
    rm = RowModel(base)
    states = [_state(rm, u) for u in users]
    logits, cache, pads = prefill(rm, PROMPTS[:len(users)], states)
    dec = LeanDecoder(rm) if lean else None
    kv = dec.new_cache() if lean else BatchCache()
    kv.join(cache, pads)
    seqs = [list(p) for p in PROMPTS[:len(users)]]
    batch = rm.batch(states)
    for _ in range(4):
        toks = logits.argmax(-1).tolist()
        for s, t in zip(seqs, toks):
            s.append(t)
        logits = dec.step(kv, toks, batch) if lean else decode_step(rm, kv, toks, batch)
        for b, (u, s) in enumerate(zip(users, seqs)):
            assert (logits[b] - _alone_logits(base, u, s)[-1]).abs().max() < TOL, b


@torch.no_grad()
def _greedy_alone(base, adapted, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_alone_logits(base, adapted, seq)[-1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("lean", [True, False])
def test_rows_joining_and_leaving_the_engine_keep_their_own_greedy_tokens(base, tmp_path, lean):
    users = _users(base, tmp_path)
    rm = RowModel(base)
    engine = Engine(rm, str, eos_id=None, max_batch=8, lean="auto" if lean else None)
    try:
        lengths = [3, 9, 6, 12, 7, 4, 8, 5]
        first = [engine.submit(Job("generate", PROMPTS[i], _state(rm, u), f"u{i}", lengths[i], 0.0))
                 for i, u in enumerate(users)]
        first[0].result(60)  # row 0 has left; now two more join a running batch
        late = [engine.submit(Job("generate", PROMPTS[2], _state(rm, users[i]), f"v{i}", 5, 0.0)) for i in (3, 4, 1)]
        for i, f in enumerate(first):
            assert f.result(60).ids == _greedy_alone(base, users[i], PROMPTS[i], lengths[i]), i
        for i, f in zip((3, 4, 1), late):
            assert f.result(60).ids == _greedy_alone(base, users[i], PROMPTS[2], 5), i
        assert engine.stats()["largest_batch"] >= 4
    finally:
        engine.close()


def _tokens(seed, n=3000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["lora", "ia3", "vera", "loraxs", "road"])
def test_each_user_in_a_fleet_equals_that_user_trained_alone(tiny, method):
    from sharedllm.personalise import new_adapter

    users = {f"user{i}": _tokens(10 + i) for i in range(3)}
    cfgs = {u: replace(TrainConfig(steps=8, batch=2, seq=32), lr=1e-3 * (i + 1), seed=i) for i, u in enumerate(users)}
    fleet = train_fleet(tiny, users, cfgs, method=method)
    for user, tokens in users.items():
        alone = personalise(tiny, tokens, method, cfgs[user])
        assert fleet[user].method == method and set(fleet[user].params) == set(alone.params)
        start = new_adapter(tiny, method, seed=cfgs[user].seed).params
        moved = max((p - start[n]).abs().max().item() for n, p in alone.params.items())
        assert moved > 1e-3, "the adapter must move far more than the tolerance for the test to mean anything"
        diff = max((fleet[user].params[n] - alone.params[n]).abs().max().item() for n in alone.params)
        assert diff < TOL, (user, diff)
        assert fleet[user].result.losses == pytest.approx(alone.result.losses, rel=1e-5)


def test_no_method_name_is_compared_as_a_string_outside_its_own_file():
    """Capabilities are declared by each method (adapters/*.py); nobody else asks `method == "lora"`."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "sharedllm"
    names = "|".join(sorted(METHODS))
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = []
    for path in src.rglob("*.py"):
        if path.parent.name == "adapters" and path.stem in METHODS:
            continue  # a method's own file may name itself
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(src)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_a_later_batch_reuses_a_gone_batchs_gather_buffer_and_never_a_live_one(tiny, tmp_path):
    """The LoRA kernel gathers a batch's rows into a buffer that goes back when the batch is garbage; a batch still
    alive keeps its values while later batches are built and dropped."""
    import gc

    users = _users(tiny, tmp_path)
    rm = RowModel(tiny)
    states = [_state(rm, u) for u in users][:5]
    ids = torch.tensor([PROMPTS[0][:6]] * 5)
    with torch.inference_mode():  # as the engine builds them: the gather goes into a reusable buffer
        keep = rm.batch(states)
    assert len(rm.kernels["lora"]._spare) == 0
    before = rm.forward(ids, keep).logits.clone()
    for order in ([3, 2, 1, 0, 4], [2, 3, 4, 0, 1]) * 3:  # other batches come and go, reusing buffers
        rm.forward(ids, [states[i] for i in order])
        gc.collect()
    assert torch.equal(rm.forward(ids, keep).logits, before)
    kernel = rm.kernels["lora"]
    assert 1 <= len(kernel._spare) <= 2
