"""Per-row gains: a mixed-user batch gives each row exactly what that user's model gives alone."""
import pytest
import torch

from sharedllm.arch import Base, fingerprint_model, norm_modules
from sharedllm.personalise import new_adapter
from sharedllm.serve.compute import generate_batch, score_batch
from sharedllm.adapters.rows import RowModel

from .serve_kit import reference_score


def perturbed(base, seed, scale=0.3):
    adapted = new_adapter(base, "norm")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.params.values():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return adapted


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = GemmaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    return Base(model, None, fingerprint_model(model), "tiny-gemma")


ROWS = [[256, *b"the cat sat on the mat"], [256, *b"abc"], [256, *b"a quick brown fox jumped over"]]


@pytest.fixture(params=["llama", "gemma"])
def any_base(request, tiny):
    return tiny if request.param == "llama" else tiny_gemma()


def test_mixed_batch_logits_equal_each_user_alone(any_base):
    users = [perturbed(any_base, s) for s in range(3)]
    rgm = RowModel(any_base)
    gains = [rgm.row(u.params) for u in users]
    ids = torch.tensor([r + [0] * (30 - len(r)) for r in ROWS])
    logits = rgm.forward(ids, gains).logits
    for b, (u, row) in enumerate(zip(users, ROWS)):
        ref = u.model(input_ids=torch.tensor([row])).logits[0]
        assert (logits[b, : len(row)] - ref).abs().max().item() < 1e-5
    other = u.model(input_ids=torch.tensor([ROWS[0]])).logits[0]  # the check can fail: another user differs
    assert (logits[0, : len(ROWS[0])] - other).abs().max().item() > 1e-2


def test_base_gains_reproduce_the_base_and_the_base_is_untouched(any_base):
    rgm = RowModel(any_base)
    assert all(type(m).__name__ != "RowGainRMSNorm" for m in norm_modules(any_base.model).values())
    assert fingerprint_model(any_base.model) == any_base.fingerprint
    ids = torch.tensor([ROWS[0]])
    assert torch.equal(rgm.forward(ids, [rgm.base_row]).logits, any_base.model(input_ids=ids).logits)
    assert rgm.model.lm_head.weight is any_base.model.lm_head.weight  # weights are shared, not copied


def test_norms_refuse_to_run_without_per_row_gains(tiny):
    rgm = RowModel(tiny)
    with pytest.raises(RuntimeError, match="no RowBatch given"):
        rgm.model(input_ids=torch.tensor([ROWS[0]]))


def test_batched_scores_equal_single_scores(tiny):
    users = [perturbed(tiny, s) for s in range(3)]
    rgm = RowModel(tiny)
    out = score_batch(rgm, ROWS, [rgm.row(u.params) for u in users])
    for o, u, row in zip(out, users, ROWS):
        assert o.tokens == len(row) - 1 and o.logprob == pytest.approx(reference_score(u.model, row), abs=1e-4)


def test_left_padded_greedy_generation_equals_each_user_alone(tiny):
    users = [perturbed(tiny, s, scale=0.6) for s in range(3)]
    rgm = RowModel(tiny)
    gains = [rgm.row(u.params) for u in users]
    out = generate_batch(rgm, ROWS, gains, [8, 5, 8], [0.0] * 3, [None] * 3, eos_id=None)
    for o, u, row, n in zip(out, users, ROWS, [8, 5, 8]):
        ref = u.model.generate(torch.tensor([row]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert o.ids == ref[0, len(row):].tolist() and o.finish_reason == "length"


def test_sampled_generation_in_a_batch_equals_the_same_row_alone(tiny):
    users = [perturbed(tiny, s, scale=0.6) for s in range(3)]
    rgm = RowModel(tiny)
    gains = [rgm.row(u.params) for u in users]
    batch = generate_batch(rgm, ROWS, gains, [12] * 3, [1.0] * 3, [11, 12, 13], eos_id=None)
    for i in range(3):
        single = generate_batch(rgm, [ROWS[i]], [gains[i]], [12], [1.0], [11 + i], eos_id=None)[0]
        assert batch[i].ids == single.ids
    assert len({tuple(b.ids) for b in batch}) == 3


def test_generation_stops_at_eos_per_row(tiny):
    rgm = RowModel(tiny)
    greedy = generate_batch(rgm, ROWS[:1], [rgm.base_row], [6], [0.0], [None], eos_id=None)[0].ids
    stop = greedy[2]
    out = generate_batch(rgm, ROWS[:2], [rgm.base_row] * 2, [6, 6], [0.0] * 2, [None] * 2, eos_id=stop)
    assert out[0].ids == greedy[: greedy.index(stop) + 1] and out[0].finish_reason == "stop"


def test_engine_score_batches_bound_rows_and_padded_tokens(monkeypatch):
    """A batch holds at most max_batch rows and max_batch_tokens padded positions (the continuous-batching
    engine's score batches; the scoring itself is stubbed to record batch sizes)."""
    from sharedllm.serve import scheduler
    from sharedllm.serve.scheduler import Engine, Job

    sizes = []
    from types import SimpleNamespace

    monkeypatch.setattr(scheduler, "score_batch", lambda rgm, rows, gains: sizes.append(len(rows)) or
                        [SimpleNamespace(n=len(rows), tokens=len(r) - 1) for r in rows])
    engine = Engine(None, str, None, max_batch=3, max_batch_tokens=40, window_s=0.5)
    jobs = [Job("score", [1] * n, row=None) for n in (10, 10, 10, 30, 5)]
    futures = [engine.submit(j) for j in jobs]
    assert [f.result(timeout=30).n for f in futures] == [3, 3, 3, 1, 1]  # 3 x 10 fit; 30 + 5 pads to 2 x 30 > 40
    assert sizes == [3, 1, 1]
    engine.close()
