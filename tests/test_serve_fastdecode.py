"""The lean decode step (serve.fastdecode) against the HF forward it replaces: same logits per row (fp32 within
1e-4), same greedy tokens, with mixed users and prompt lengths, rows joining and leaving, and the KV buffer
growing past its capacity; bf16, int8, int4 and int8-with-int4-head weights close to it; unsupported
architectures fall back to the HF path."""
import copy

import pytest
import torch
from fastapi.testclient import TestClient

from sharedllm.arch import Base, fingerprint_model
from sharedllm.cli import build_parser
from sharedllm.commands.serve import _app
from sharedllm.errors import SharedLLMError
from sharedllm.serve.compute import decode_step, prefill
from sharedllm.serve.fastdecode import INT4_GROUP, LeanCache, LeanDecoder, quantise_int4, quantise_int8
from sharedllm.serve.kv import BatchCache
from sharedllm.adapters.rows import RowModel
from sharedllm.serve.router import DECODE_DTYPES, lean_decoder
from sharedllm.serve.scheduler import Engine, Job
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN
from .test_serve_rowgains import perturbed, tiny_gemma

FIRST = [[256, *b"the cat sat on the mat"], [256, *b"abc"], [256, *b"a quick brown fox jumped"]]
LATE = [[256, *b"x"], [256, *b"hello there, general kenobi"]]


def tiny_qwen2(vocab: int = 258):
    """A 2-layer Qwen2 (q/k/v biases) with the byte vocabulary (`vocab` > 258: unused tokens after it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or n.endswith("norm.weight"):
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return Base(model, None, fingerprint_model(model), "tiny-qwen2")


def lockstep(rgm, dec, users, steps=14, join_at=3, leave_at=7):
    """Decode the HF path and `dec` side by side on the same tokens (the HF path's greedy ones); rows LATE join
    at step `join_at`, row 1 leaves at `leave_at`. Yields (HF logits, lean logits) per step."""
    gains = [rgm.row(u.params) for u in users]
    old, new = BatchCache(), LeanCache(chunk=4)  # a small chunk: the buffer grows several times

    def join(prompts, g):
        logits, cache, pads = prefill(rgm, prompts, g)
        old.join(cache, pads)
        new.join(copy.deepcopy(cache), pads)
        return logits.argmax(-1).tolist()

    rows, toks = list(gains[:3]), join(FIRST, gains[:3])
    for step in range(steps):
        if step == join_at:
            rows, toks = rows + gains[3:], toks + join(LATE, gains[3:])
        if step == leave_at:
            keep = [i for i in range(len(rows)) if i != 1]
            old.keep(keep)
            new.keep(keep)
            rows, toks = [rows[i] for i in keep], [toks[i] for i in keep]
        stacked = rgm.batch(rows)
        a, b = decode_step(rgm, old, toks, stacked), dec.step(new, toks, stacked)
        assert new.width == old.width and new.pads == old.pads
        yield a, b
        toks = a.argmax(-1).tolist()


@pytest.fixture(params=["llama", "qwen2"])
def any_base(request, tiny):
    return tiny if request.param == "llama" else tiny_qwen2()


@pytest.mark.parametrize("fuse", [False, True])
def test_lean_step_equals_the_hf_forward_per_row(any_base, fuse):
    users = [perturbed(any_base, s, scale=0.6) for s in range(5)]
    rgm = RowModel(any_base)
    dec = LeanDecoder(rgm, torch.float32, fuse=fuse)
    for a, b in lockstep(rgm, dec, users):
        assert (a - b).abs().max().item() < 1e-4
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


def test_each_row_keeps_its_own_gains(tiny):
    """The check above can fail: the same tokens under another user's gains give other logits."""
    users = [perturbed(tiny, s, scale=0.6) for s in range(5)]
    rgm = RowModel(tiny)
    a, b = next(lockstep(rgm, LeanDecoder(rgm), users))
    swapped = next(lockstep(rgm, LeanDecoder(rgm), [users[1], users[0], *users[2:]]))[1]
    assert (b[0] - swapped[0]).abs().max().item() > 1e-2 and (a[0] - b[0]).abs().max().item() < 1e-4


def test_a_lone_row_equals_the_hf_forward(tiny):
    """One row (no padding mask; the bf16 path takes torch.mv), for fp32 exactly and bf16 approximately."""
    rgm = RowModel(tiny)
    g = [rgm.row(perturbed(tiny, 3, scale=0.6).params)]
    logits, cache, pads = prefill(rgm, FIRST[:1], g)
    old, toks = BatchCache(), logits.argmax(-1).tolist()
    old.join(cache, pads)
    decs = {dt: (LeanDecoder(rgm, dt), LeanCache(chunk=2)) for dt in (torch.float32, torch.bfloat16)}
    for dec, kv in decs.values():
        kv.join(copy.deepcopy(cache), pads)
    for _ in range(6):
        a = decode_step(rgm, old, toks, rgm.batch(g))
        b32, b16 = (dec.step(kv, toks, rgm.batch(g)) for dec, kv in decs.values())
        assert (a - b32).abs().max().item() < 1e-4 and a.argmax(-1).tolist() == b32.argmax(-1).tolist()
        assert (a - b16).abs().max().item() < 5e-2  # bf16 weights: close, not exact
        toks = a.argmax(-1).tolist()


def test_bf16_weights_stay_close_in_a_mixed_batch(tiny):
    users = [perturbed(tiny, s, scale=0.6) for s in range(5)]
    rgm = RowModel(tiny)
    for a, b in lockstep(rgm, LeanDecoder(rgm, torch.bfloat16), users):
        assert (a - b).abs().max().item() < 5e-2


def test_unsupported_architectures_fall_back_to_the_hf_forward():
    gemma = tiny_gemma()
    rgm = RowModel(gemma)
    assert LeanDecoder.build(rgm) is None and lean_decoder(rgm, "lean", "fp32") is None
    for dtype in ("bf16", "int8", "int8-head4"):
        with pytest.raises(SharedLLMError, match=dtype):
            lean_decoder(rgm, "lean", dtype)
    engine = Engine(rgm, str, eos_id=None, max_batch=4)
    try:
        user = perturbed(gemma, 0)
        job = Job("generate", FIRST[0], rgm.row(user.params), "u0", 5)
        got = engine.submit(job).result(timeout=120).ids
        ref = user.model.generate(torch.tensor([FIRST[0]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert got == ref[0, len(FIRST[0]):].tolist() and engine.stats()["decode"] == "hf"
    finally:
        engine.close()


def test_the_engine_decodes_with_the_lean_step_by_default(tiny):
    engine = Engine(RowModel(tiny), str, eos_id=None)
    try:
        assert engine.stats()["decode"] == "lean-fp32" and isinstance(engine.kv, LeanCache)
    finally:
        engine.close()


# int8 weights (per output channel, bf16 activations): close to fp32, not exact. On the tiny bases the logits
# (|logit| < ~1.5) move by ~5e-3; INT8_TOL leaves room for the bf16 activation and output rounding.
INT8_TOL = 3e-2


def test_int8_quantisation_is_per_output_channel_and_symmetric():
    w = torch.randn(6, 32) * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0])[:, None]
    q, scale = quantise_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and q.abs().max().item() <= 127
    back = q.float() * scale.float()[:, None]
    assert ((back - w).abs().amax(1) <= 0.6 * scale.float() + 1e-2 * w.abs().amax(1)).all()


def test_int8_weights_stay_close_in_a_mixed_batch(any_base):
    """Mixed users and prompt lengths, rows joining and leaving, the buffer growing: int8 near the HF forward."""
    users = [perturbed(any_base, s, scale=0.6) for s in range(5)]
    rgm = RowModel(any_base)
    dec = LeanDecoder(rgm, torch.int8)
    assert dec.name == "lean-int8" and dec.head.weight.dtype == torch.int8
    for a, b in lockstep(rgm, dec, users):
        assert (a - b).abs().max().item() < INT8_TOL


def _one_step(rgm, dec, prompts, gains):
    """(HF logits, lean logits) of the first decode step after prefilling `prompts` together."""
    logits, cache, pads = prefill(rgm, prompts, gains)
    old, kv = BatchCache(), LeanCache(chunk=2)
    old.join(copy.deepcopy(cache), pads)
    kv.join(cache, pads)
    toks, stacked = logits.argmax(-1).tolist(), rgm.batch(gains)
    return decode_step(rgm, old, toks, stacked), dec.step(kv, toks, stacked)


def test_int8_lone_row_stays_close(tiny):
    rgm = RowModel(tiny)
    a, b = _one_step(rgm, LeanDecoder(rgm, torch.int8), FIRST[:1], [rgm.row(perturbed(tiny, 3, 0.6).params)])
    assert (a - b).abs().max().item() < INT8_TOL


def test_int8_rows_keep_their_own_gains(tiny):
    """The same prompt twice in one batch under two users' gains: two different rows, each near its HF row."""
    rgm = RowModel(tiny)
    gains = [rgm.row(perturbed(tiny, s, scale=0.6).params) for s in (0, 1)]
    a, b = _one_step(rgm, LeanDecoder(rgm, torch.int8), [FIRST[0], FIRST[0]], gains)
    assert (a - b).abs().max().item() < INT8_TOL
    assert (b[0] - b[1]).abs().max().item() > 10 * INT8_TOL


@pytest.mark.parametrize("dtype", ["int8", "int4", "int8-head4", "int4-head8"])
def test_the_serve_command_takes_a_decode_dtype_and_health_reports_it(tmp_path, monkeypatch, dtype):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    parser, _ = build_parser()
    args = parser.parse_args(["serve", "--base", "tiny", "--store", str(tmp_path / "s"), "--decode-dtype", dtype])
    app, router, *_ = _app(args)
    try:
        assert TestClient(app).get("/health").json()["decode"] == f"lean-{dtype}"
    finally:
        router.close()
        router.store.close()
    with pytest.raises(SystemExit):  # argparse names the choices on stderr
        parser.parse_args(["serve", "--decode-dtype", "int3"])
    with pytest.raises(SharedLLMError, match="needs --decode lean"):
        lean_decoder(router.model, "hf", dtype)


# tiny bases (random weights), logits of scale ~1, measured from the HF path: int4 layers 0.03-0.04 (Llama, its head
# int8); Qwen2 with vocab 272: int4 everywhere 0.06, int8 layers + int4 head 0.04, int4 layers + int8 head 0.03;
# int8 0.005
INT4_TOL = 0.1


@pytest.fixture(params=["llama-258", "qwen2-272"])
def int4_base(request, tiny):
    """The tiny Llama (vocab 258: the int4 kernel needs outputs % 16 == 0, so its head stays int8) and a tiny
    Qwen2 whose head can be int4 (vocab 272)."""
    return tiny if request.param == "llama-258" else tiny_qwen2(vocab=272)


def test_int4_quantisation_is_groupwise_and_asymmetric():
    w = torch.randn(16, 128) * torch.linspace(1e-3, 10.0, 16)[:, None] + 0.5
    packed, sz, back = quantise_int4(w, 64)
    assert sz.shape == (2, 16, 2) and sz.dtype == torch.bfloat16
    scale = sz[..., 0].float().t().repeat_interleave(64, dim=1)  # [16, 128]
    assert ((back - w).abs() <= 0.6 * scale + 1e-2 * w.abs()).all()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(128, dtype=torch.bfloat16), packed, 64, sz).float()
    assert torch.allclose(y.t(), back, rtol=1e-2, atol=1e-2 * w.abs().amax().item())


@pytest.mark.parametrize("dtype", ["int4", "int8-head4", "int4-head8"])
def test_int4_rows_keep_their_own_gains_and_stay_close(int4_base, dtype):
    """int4 everywhere, or int4 only in the layers or only in the head (--decode-dtype int4-head8, int8-head4):
    each matrix packed as asked (an int4 head as int8 where the kernel cannot take it). Two users' gains on the same
    prompt: two different rows, each within INT4_TOL of its HF row; a lone row too."""
    rgm = RowModel(int4_base)
    dec = lean_decoder(rgm, "lean", dtype)
    packable = rgm.model.config.vocab_size % 16 == 0
    layers, head = (d == torch.int4 for d in DECODE_DTYPES[dtype])
    head = head and packable
    assert dec.name == f"lean-{dtype}" and dec.layers[0].down.group == (INT4_GROUP if layers else 0)
    assert dec.layers[0].down.weight.dtype == (torch.uint8 if layers else torch.int8)
    assert dec.head.group == (INT4_GROUP if head else 0) and dec.head.weight.dtype == (torch.uint8 if head else torch.int8)
    gains = [rgm.row(perturbed(int4_base, s, scale=0.6).params) for s in (0, 1)]
    a, b = _one_step(rgm, dec, [FIRST[0], FIRST[0]], gains)
    assert (a - b).abs().max().item() < INT4_TOL
    assert (b[0] - b[1]).abs().max().item() > 3 * INT4_TOL
    a, b = _one_step(rgm, dec, FIRST[:1], gains[:1])
    assert (a - b).abs().max().item() < INT4_TOL
    if "-head" in dtype:  # only the head differs from the same layers' dtype alone: the logits move iff one is int4
        same = _one_step(rgm, lean_decoder(rgm, "lean", dtype.split("-")[0]), FIRST[:1], gains[:1])[1]
        assert ((b - same).abs().max().item() > 1e-3) == packable
