"""Ternary base: trit packing, codes, bits/weight, the file format, corruption, binding, CLI round trip."""
import json
import math
import struct

import pytest
import torch

from sharedllm.base import load_base
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, save_adapted
from sharedllm.quant.gptq import out_error, quantize_matrix, refit
from sharedllm.quant.ptq import METHODS, PTQConfig, asym_fit, quantize_model
from sharedllm.quant.ternary import (TernaryTensor, Int8Tensor, bits_per_weight, decoder_linears, pack_trits,
                                     save_ternary_base, unpack_trits)

CFG = PTQConfig(calib_seqs=4, calib_len=32, repair_batch=2)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4096,), generator=g)


@pytest.fixture(scope="module")
def tfile(tiny, calib, tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "tiny_ternary.safetensors"
    model, q = quantize_model(tiny.model, "gptq-asym", calib, CFG)
    meta = save_ternary_base(path, model, tiny.tokenizer, q, {"method": "gptq-asym", "params": CFG.used("gptq-asym"),
                                                               "source_fingerprint": tiny.fingerprint})
    return path, q, meta


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 11, 243, 1001])
def test_pack_unpack_exact_for_lengths_not_divisible_by_5(n):
    codes = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 5)
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_trits(packed, n), codes)


def test_pack_extremes_and_refusals():
    assert pack_trits(torch.ones(5, dtype=torch.int8)).item() == 242
    assert pack_trits(-torch.ones(5, dtype=torch.int8)).item() == 0
    with pytest.raises(SharedLLMError):
        pack_trits(torch.tensor([0, 2, -1]))
    with pytest.raises(SharedLLMError, match="above 242"):
        unpack_trits(torch.tensor([243], dtype=torch.uint8), 5)
    with pytest.raises(SharedLLMError, match="expected 2"):
        unpack_trits(torch.tensor([1], dtype=torch.uint8), 6)


@pytest.mark.parametrize("method", list(METHODS))
def test_codes_only_ternary_and_model_untouched(method, tiny, calib):
    before = {n: p.clone() for n, p in tiny.model.state_dict().items()}
    model, q = quantize_model(tiny.model, method, calib, CFG)
    assert set(q) == set(decoder_linears(tiny.model))
    for t in q.values():
        assert set(t.codes.unique().tolist()) <= {-1, 0, 1}
    for n, p in tiny.model.state_dict().items():
        assert torch.equal(p, before[n])  # the source stays the teacher
    lin = decoder_linears(model)
    for n, t in q.items():
        assert torch.equal(lin[n].weight, t.dequant())


def test_bits_per_weight_formula():
    t = TernaryTensor(torch.zeros(576, 576), torch.ones(576, 1), torch.zeros(576, 1))
    assert t.bits() == 8 * math.ceil(576 * 576 / 5) + 2 * 16 * 576
    assert bits_per_weight({"a": t}) == pytest.approx(8 * 66356 / 331776 + 32 / 576)
    sym = TernaryTensor(torch.zeros(7, 9), torch.ones(1, 1))
    assert sym.bits() == 8 * 13 + 16
    k = Int8Tensor.quantize(torch.randn(4, 10))
    assert bits_per_weight({"a": sym, "b": k}) == pytest.approx((8 * 13 + 16 + 8 * 40 + 16 * 4) / 103)


def test_asym_fit_beats_absmean_and_refit_is_least_squares():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 96, generator=g) + 0.3
    X = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)
    H = X.T @ X / 512
    absm = TernaryTensor(torch.round(torch.clamp(W / W.abs().mean(), -1, 1)), W.abs().mean().reshape(1, 1))
    a = asym_fit(W)
    assert (W - a.dequant()).pow(2).sum() < (W - absm.dequant()).pow(2).sum()
    q, err = quantize_matrix(W, H, PTQConfig())
    assert err < out_error(W, a.dequant(), H)  # error feedback on real input statistics helps
    alpha, mu = refit(W, H, q.codes.float(), 1)
    best = out_error(W, alpha * q.codes + mu, H)
    for d in (1e-3, -1e-3):
        assert out_error(W, (alpha + d) * q.codes + mu, H) > best
        assert out_error(W, alpha * q.codes + mu + d, H) > best


def test_file_round_trip_is_exact(tfile, tiny):
    path, q, meta = tfile
    base = load_base(str(path))
    assert base.fingerprint == meta["fingerprint"] != tiny.fingerprint
    assert base.meta["source_fingerprint"] == tiny.fingerprint
    lin = decoder_linears(base.model)
    for n, t in q.items():
        assert torch.equal(lin[n].weight, t.dequant())
    emb = tiny.model.get_input_embeddings().weight
    assert torch.equal(base.model.get_input_embeddings().weight, emb.half().float())
    assert base.model.get_output_embeddings().weight is base.model.get_input_embeddings().weight
    assert meta["bits_per_weight"] == pytest.approx(bits_per_weight(q))
    assert meta["bytes"] == path.stat().st_size
    assert base.tokenizer.encode("hé") == tiny.tokenizer.encode("hé")


def test_a_base_with_biases_round_trips(tiny, calib, tmp_path):
    """Qwen2's q/k/v biases are stored beside their quantised matrices and must load back (the 0.5B base's file
    was refused before: the loader dropped every tensor of a quantised module, biases included)."""
    from .test_serve_fastdecode import tiny_qwen2

    qwen = tiny_qwen2().model
    model, q = quantize_model(qwen, "absmean", calib, CFG)
    path = tmp_path / "qwen_ternary.safetensors"
    save_ternary_base(path, model, tiny.tokenizer, q, {"method": "absmean", "params": CFG.used("absmean"),
                                                        "source_fingerprint": "x" * 64})
    back = load_base(str(path)).model
    bias = "model.layers.1.self_attn.k_proj.bias"
    assert torch.equal(back.get_parameter(bias), qwen.get_parameter(bias)) and qwen.get_parameter(bias).abs().sum() > 0
    lin = decoder_linears(back)
    assert all(torch.equal(lin[n].weight, t.dequant()) for n, t in q.items())


def test_inspect_reports_base_fields(tfile, capsys):
    path, _, meta = tfile
    assert main(["inspect", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "base" and r["bits_per_weight"] == pytest.approx(meta["bits_per_weight"])
    assert r["bytes"] == path.stat().st_size and r["fingerprint"] == meta["fingerprint"]
    assert r["source_fingerprint"] == meta["source_fingerprint"]


def test_a_result_records_the_ternary_base_from_its_header(tfile):
    from sharedllm.bets.context import TERNARY_RECORD, ternary_record

    path, _, meta = tfile
    assert ternary_record(path) == {k: meta[k] for k in TERNARY_RECORD if k in meta}
    assert {"method", "fingerprint", "source_fingerprint"} <= set(ternary_record(path))


def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def test_truncated_and_tampered_files_refused(tfile, tmp_path):
    path, _, _ = tfile
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:-100])
    with pytest.raises(SharedLLMError, match="truncated"):
        load_base(str(bad))
    flipped = bytearray(data)
    flipped[_header_len(data) + 10] ^= 0x01
    bad.write_bytes(bytes(flipped))
    with pytest.raises(SharedLLMError, match="sha256"):
        load_base(str(bad))
    n = _header_len(data)
    header = data[8:n].decode()
    tampered = header.replace('num_hidden_layers\\":2', 'num_hidden_layers\\":1')
    assert tampered != header and len(tampered) == len(header)
    bad.write_bytes(data[:8] + tampered.encode() + data[n:])
    with pytest.raises(SharedLLMError, match="fingerprint"):
        load_base(str(bad))


def test_adapter_file_is_not_a_base(tiny, tmp_path):
    p = save_adapted(new_adapter(tiny, "norm"), tmp_path / "a.safetensors", tiny)
    with pytest.raises(SharedLLMError, match="not a sharedllm-ternary-base"):
        load_base(str(p))


def test_binding_refused_both_ways(tfile, tiny, tmp_path):
    path, _, meta = tfile
    tern = load_base(str(path))
    on_fp = save_adapted(new_adapter(tiny, "norm"), tmp_path / "fp.safetensors", tiny)
    on_t = save_adapted(new_adapter(tern, "norm"), tmp_path / "t.safetensors", tern)
    for adapter, wrong, trained in ((on_fp, tern, tiny), (on_t, tiny, tern)):
        with pytest.raises(SharedLLMError) as e:
            load_adapted(wrong, adapter)
        assert trained.fingerprint[:16] in str(e.value) and wrong.fingerprint[:16] in str(e.value)
    assert load_adapted(tern, on_t).meta["base_fingerprint"] == meta["fingerprint"]


def test_repair_changes_norms_and_scales_not_codes(tiny, calib):
    cfg = PTQConfig(calib_seqs=4, calib_len=32, repair_steps=3, repair_batch=2, repair_lr=1e-2)
    torch.manual_seed(0)
    m0, q0 = quantize_model(tiny.model, "asym", None, PTQConfig())
    m1, q1 = quantize_model(tiny.model, "asym", calib, cfg)
    for n in q0:
        assert torch.equal(q0[n].codes, q1[n].codes)
    assert any(not torch.equal(q0[n].alpha, q1[n].alpha) for n in q0)
    assert not torch.equal(m0.model.norm.weight, m1.model.norm.weight)
    assert all(not p.requires_grad for p in m1.parameters())


def test_cli_quantize_then_adapt_and_eval_on_the_file(tmp_path, capsys):
    text = tmp_path / "u.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "b.safetensors"
    assert main(["quantize", "--base", "tiny", "--out", str(out), "--method", "gptq-asym", "--calib", str(text),
                 "--calib-seqs", "4", "--calib-len", "64", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    ad = tmp_path / "a.safetensors"
    assert main(["adapt", "--base", str(out), "--text", str(text), "--out", str(ad), "--steps", "2", "--seq", "32",
                 "--window", "32", "--eval-tokens", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["base_fingerprint"] == q["fingerprint"]
    assert main(["eval", "--base", str(out), "--text", str(text), "--adapter", str(ad), "--window", "32",
                 "--eval-tokens", "64", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["ppl"] == pytest.approx(r["ppl_after"], rel=1e-3)
    assert main(["eval", "--base", "tiny", "--text", str(text), "--adapter", str(ad), "--window", "32"]) == 2
    assert "trained on base" in capsys.readouterr().err


def test_quantize_needs_calib_for_gptq(tmp_path, capsys):
    assert main(["quantize", "--base", "tiny", "--out", str(tmp_path / "x"), "--method", "gptq-asym"]) == 2
    assert "--calib" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a stopped quantise resumes
QCFG = PTQConfig(calib_seqs=4, calib_len=64, repair_steps=6, repair_batch=2, repair_lr=1e-2)


def _calib_text(tmp_path, seed: int):
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "paper"]
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"calib{seed}.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, 8, (600,), generator=g).tolist()))
    return path


def _stopping_at_repair_step(monkeypatch, stop_at: int):
    """Each repair snapshot sends this process a real SIGTERM after repair step `stop_at`."""
    import os
    import signal

    from sharedllm.quant.stages import QuantiseStages

    made = QuantiseStages.repair_snapshot

    def repair_snapshot(self):
        snap = made(self)
        after = snap.after_step
        snap.after_step = lambda step, *a: (step == stop_at and os.kill(os.getpid(), signal.SIGTERM), after(step, *a))
        return snap
    monkeypatch.setattr(QuantiseStages, "repair_snapshot", repair_snapshot)


def _fingerprint(path):
    from sharedllm.quant.ternary import read_ternary_file

    return read_ternary_file(path)[1]["fingerprint"]


def test_a_quantise_stopped_in_its_repair_pass_resumes_to_the_uninterrupted_file(tmp_path, monkeypatch, capsys):
    import signal

    from sharedllm.quant import ptq
    from sharedllm.quant.make import ternarise

    calib = _calib_text(tmp_path, 0)
    whole = tmp_path / "whole.safetensors"
    ternarise("tiny", whole, "gptq-asym", calib, QCFG)
    out = tmp_path / "b.safetensors"
    with monkeypatch.context() as m:
        _stopping_at_repair_step(m, 3)
        with pytest.raises(SystemExit) as stop:
            ternarise("tiny", out, "gptq-asym", calib, QCFG)
    assert stop.value.code == 128 + signal.SIGTERM
    codes, snap = out.with_suffix(".codes.safetensors"), out.with_suffix(".snapshot.safetensors")
    assert codes.is_file() and snap.is_file() and not out.exists()
    capsys.readouterr()

    def no_quantising(*a):
        raise AssertionError("the kept codes must be taken, not quantised again")
    monkeypatch.setitem(ptq.METHODS, "gptq-asym", no_quantising)
    ternarise("tiny", out, "gptq-asym", calib, QCFG)
    err = capsys.readouterr().err
    assert "taking the quantised matrices from" in err and "at step 3/6" in err
    assert _fingerprint(out) == _fingerprint(whole), "the resumed file must be the uninterrupted one, bit for bit"
    assert not codes.exists() and not snap.exists(), "a finished quantise leaves no stage file behind"


def test_kept_codes_of_another_text_or_damaged_are_ignored(tmp_path, monkeypatch, capsys):
    from sharedllm.quant.make import ternarise

    out = tmp_path / "b.safetensors"
    with monkeypatch.context() as m:
        _stopping_at_repair_step(m, 2)
        with pytest.raises(SystemExit):
            ternarise("tiny", out, "gptq-asym", _calib_text(tmp_path, 0), QCFG)
    codes = out.with_suffix(".codes.safetensors")
    kept = codes.read_bytes()
    capsys.readouterr()
    other = _calib_text(tmp_path, 1)  # another calibration text: neither stage file is this run's
    ternarise("tiny", out, "gptq-asym", other, QCFG)
    err = capsys.readouterr().err
    assert "ignoring kept codes" in err and "another run" in err and "resuming" not in err
    whole = tmp_path / "whole.safetensors"
    ternarise("tiny", whole, "gptq-asym", other, QCFG)
    assert _fingerprint(out) == _fingerprint(whole)

    damaged = bytearray(kept)
    damaged[-10] ^= 0xFF  # a flipped payload byte: the digest no longer matches
    codes.write_bytes(bytes(damaged))
    ternarise("tiny", out, "gptq-asym", _calib_text(tmp_path, 0), QCFG)
    assert "ignoring kept codes" in capsys.readouterr().err
    assert not codes.exists()
