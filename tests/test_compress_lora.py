"""Compressed LoRA (issue 32 item 1): int4 group-wise schemes for any method's flat tensor (round trip, the strict
parser's refusals), LoRA rank truncation (exact at full rank, SVD-optimal below), int8 / int4 / truncated LoRA
files through compress, load_adapted, eval, inspect and the server, and the policy's LoRA candidates."""
import json
import math
import re

import pytest
import torch

from sharedllm import wire
from sharedllm.adapters import adapter_state
from sharedllm.adapters.lora import LoraConfig
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted
from sharedllm.quant import adapter_int4, lora_rank
from sharedllm.quant.compress import candidate_specs, encode_adapter, parse_spec, policy_for
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, adapter_bytes, alone, reference_score, text_ids

LAYOUT = [("a.weight", (64,)), ("b.weight", (101,)), ("m.weight", (3, 7)), ("c.weight", (1,))]


def _flat(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for _, s in LAYOUT)
    if kind == "gains":  # norm / ia3: near 1.0, a small spread
        return 1.0 + 0.05 * torch.randn(n, generator=g)
    if kind == "lora":  # zero-centred factors
        return 0.02 * torch.randn(n, generator=g)
    if kind == "large":  # a full fine-tune's biases reach a few hundred
        return 300 * torch.randn(n, generator=g)
    if kind == "constant":  # every group one value (all codes 0)
        return torch.full((n,), 0.75)  # an fp16 value: offset = it, every code 0, exact
    raise ValueError(kind)


@pytest.mark.parametrize("scheme", adapter_int4.SCHEMES)
@pytest.mark.parametrize("kind", ["gains", "lora", "large", "constant"])
def test_int4_round_trip_within_half_a_step(scheme, kind):
    flat = _flat(kind)
    tensors, meta = adapter_int4.encode(flat, LAYOUT, None, scheme)
    back = adapter_int4.decode(tensors, meta, LAYOUT)
    bound = adapter_int4.max_error(flat, LAYOUT, scheme)
    err = (back - flat).abs()
    assert (err <= bound + 1e-6 * flat.abs()).all(), (err / bound).max()  # fp32 rounding of offset + code x scale
    if kind == "constant":
        assert err.max() == 0
    else:
        assert err.max() > 0  # it really is lossy
        # and the step is the group's own range / 15 (fp16-rounded), not a coarser one
        g = adapter_int4.INT4_GROUPS[scheme]
        first = flat[:g]
        ulp = first.abs().max() * 2 ** -10  # the offset is the minimum rounded down to fp16
        assert bound[0] <= (first.max() - first.min() + ulp) / 15 * (1 + 2 ** -10) / 2 + 1e-7


@pytest.mark.parametrize("scheme", adapter_int4.SCHEMES)
def test_int4_groups_stay_within_tensors_and_pack_two_codes_a_byte(scheme):
    g = adapter_int4.INT4_GROUPS[scheme]
    flat = _flat("lora")
    tensors, _ = adapter_int4.encode(flat, LAYOUT, None, scheme)
    groups = sum(math.ceil(math.prod(s) / g) for _, s in LAYOUT)
    assert tensors["scales"].dtype == tensors["offsets"].dtype == torch.float16
    assert tensors["scales"].numel() == tensors["offsets"].numel() == groups
    assert tensors["adapter"].dtype == torch.uint8 and tensors["adapter"].numel() == (flat.numel() + 1) // 2
    assert flat.numel() % 2 and int(tensors["adapter"][-1]) >> 4 == 0  # odd count: the last high nibble pads
    codes = wire.unpack_nibbles(tensors["adapter"], flat.numel(), "t")
    assert torch.equal(wire.pack_nibbles(codes), tensors["adapter"]) and int(codes.max()) <= 15
    assert int(codes.max()) == 15 and int(codes.min()) == 0  # every group spans the grid


# ---- the strict parser on int4 files --------------------------------------------------------------------------
def _int4_file(scheme="int4-g32", n=33, values=None):
    """A norm-shaped int4 file of n gains (parse_file needs no base), its tensors and metadata."""
    flat = values if values is not None else 1.0 + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(1))
    layout = [("g", (flat.numel(),))]
    tensors, fields = adapter_int4.encode(flat, layout, None, scheme)
    meta = {"format": wire.FORMAT, "format_version": wire.FORMAT_VERSION, "method": "norm", "params": flat.numel(),
            "base_fingerprint": "0" * 64, "layout": wire.layout_hash(layout), "shapes": [[flat.numel()]], **fields}
    return tensors, meta


def _refusal(tensors, meta) -> str:
    """The parser's message for a file of these tensors and metadata ('' if it was accepted)."""
    try:
        wire.parse_file(wire.adapter_bytes(tensors, meta), "f.safetensors")
    except SharedLLMError as e:
        return str(e)
    return ""


def test_a_well_formed_int4_file_parses_to_its_values():
    tensors, meta = _int4_file()
    got, m = wire.parse_file(wire.adapter_bytes(tensors, meta), "f")
    assert m["scheme"] == "int4-g32" and set(got) == {"adapter", "scales", "offsets"}
    flat = adapter_int4.decode(tensors, meta, [("g", (33,))])
    assert torch.equal(got.kept_values(), flat)


def test_int4_parser_refuses_bad_scales_offsets_and_padding():
    tensors, meta = _int4_file()
    s, o, a = tensors["scales"], tensors["offsets"], tensors["adapter"]
    pad = a.clone()
    pad[-1] |= 0x30  # 33 values: the last byte's high nibble is padding
    cases = [({**tensors, "scales": torch.cat([s[:1], s.new_tensor([bad])])}, "scales must be finite and positive")
             for bad in (0.0, -0.01, math.nan, math.inf)]
    cases += [({**tensors, "offsets": torch.cat([o[:1], o.new_tensor([bad])])}, "offsets must be finite")
              for bad in (math.nan, -math.inf)]
    cases += [({**tensors, "adapter": pad}, "padding nibble"),
              # a value outside the method's bound: offset 100 on gains (norm: +-64)
              ({**tensors, "offsets": torch.full_like(o, 100.0)}, "outside the allowed range")]
    for bad_tensors, needle in cases:
        message = _refusal(bad_tensors, meta)
        assert needle in message and message.startswith("f.safetensors: ") and "\n" not in message, message


def test_int4_parser_refuses_wrong_tensors_shapes_dtypes_and_schemes():
    tensors, meta = _int4_file()
    s, o, a = tensors["scales"], tensors["offsets"], tensors["adapter"]
    cases = [({k: v for k, v in tensors.items() if k != "offsets"}, meta, "expects tensors"),
             ({**tensors, "extra": s.clone()}, meta, "expects tensors"),
             ({**tensors, "adapter": torch.cat([a, a[:1]])}, meta, r"'adapter' is U8 \[18\], scheme int4-g32 needs "
                                                                   r"U8 \[17\]"),
             ({**tensors, "adapter": a.to(torch.int8)}, meta, "needs U8"),
             ({**tensors, "scales": s.float()}, meta, "needs F16"),
             ({**tensors, "offsets": o[:1]}, meta, r"needs F16 \[2\]"),  # 33 values in groups of 32: 2 groups
             (tensors, {**meta, "scheme": "int4-g64"}, r"needs F16 \[1\]"),  # the groups of another scheme
             (tensors, {**meta, "scheme": "int4-g16"}, "scheme"),
             (tensors, {**meta, "scheme": "int4"}, "scheme")]
    for bad_tensors, bad_meta, pattern in cases:
        message = _refusal(bad_tensors, bad_meta)
        assert re.search(pattern, message) and message.startswith("f.safetensors: "), (pattern, message)


def test_decode_int4_refuses_malformed_tensors_given_directly():
    tensors, meta = _int4_file()
    layout = [("g", (33,))]
    bad = [({"adapter": tensors["adapter"], "scales": tensors["scales"]}, meta, "expects tensors"),
           ({**tensors, "adapter": tensors["adapter"][:-1]}, meta, "flat uint8 of 17 bytes"),
           ({**tensors, "scales": tensors["scales"][:1]}, meta, "one value per group"),
           ({**tensors, "offsets": tensors["offsets"].float()}, meta, "flat float16"),
           (tensors, {**meta, "scheme": "int8"}, "unknown int4 scheme")]
    for t, m, msg in bad:
        with pytest.raises(SharedLLMError, match=msg):
            wire.decode_int4(t, m, layout, "t")


# ---- rank truncation --------------------------------------------------------------------------------------------
def _lora_named(r=4, sites=(("s1", 24, 40), ("s2", 16, 16)), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for site, k, n in sites:
        out[f"{site}.lora_A.default.weight"] = torch.randn(r, k, generator=g) / k ** 0.5
        out[f"{site}.lora_B.default.weight"] = 0.1 * torch.randn(n, r, generator=g)
    return out


def _delta(named, config, site):
    s = config.alpha / config.rank
    return s * named[f"{site}.lora_B.default.weight"].double() @ named[f"{site}.lora_A.default.weight"].double()


def test_truncating_to_the_full_rank_gives_the_same_delta():
    named, cfg = _lora_named(), LoraConfig(rank=4, alpha=8)
    out, new, report = lora_rank.truncate_named(named, cfg, 4)
    assert new == cfg and report["rel_error_max"] < 1e-6
    for site in ("s1", "s2"):
        assert torch.allclose(_delta(out, new, site), _delta(named, cfg, site), atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("alpha", [8, 5])  # 8: scale 2 kept (alpha' = 2 r'); 5: 1.25 r' not whole for every r'
def test_truncation_is_the_svd_optimal_rank_r_approximation(rank, alpha):
    named, cfg = _lora_named(), LoraConfig(rank=4, alpha=alpha)
    out, new, report = lora_rank.truncate_named(named, cfg, rank)
    assert new.rank == rank and new.alpha == max(1, round(alpha / 4 * rank)) and new.targets == cfg.targets
    if alpha == 8:
        assert new.alpha / new.rank == cfg.alpha / cfg.rank  # the scale stays
    for site, k, n in (("s1", 24, 40), ("s2", 16, 16)):
        a, b = out[f"{site}.lora_A.default.weight"], out[f"{site}.lora_B.default.weight"]
        assert a.shape == (rank, k) and b.shape == (n, rank)
        d, d2 = _delta(named, cfg, site), _delta(out, new, site)
        sv = torch.linalg.svdvals(d)
        assert torch.linalg.matrix_norm(d - d2).item() == pytest.approx(sv[rank:].pow(2).sum().sqrt().item(),
                                                                         rel=1e-5)
        assert torch.linalg.matrix_norm(d - d2, ord=2).item() == pytest.approx(sv[rank].item(), rel=1e-5)
        assert torch.linalg.matrix_rank(d2).item() == rank
    assert 0 < report["rel_error_max"] < 1 and report["rank"] == 4 and report["alpha"] == alpha


def test_truncation_refuses_bad_ranks():
    named, cfg = _lora_named(), LoraConfig()
    for bad in (0, 5):
        with pytest.raises(SharedLLMError, match="truncates to a rank in 1..4"):
            lora_rank.truncate_named(named, cfg, bad)


def test_specs():
    assert parse_spec("int4-g64") == (None, "int4-g64")
    assert parse_spec("rank2") == (2, "float16") and parse_spec("rank1+int8") == (1, "int8")
    for bad in ("int5", "rankx+int8", "rank2+int4"):
        with pytest.raises(SharedLLMError, match="compression spec"):
            parse_spec(bad)


# ---- LoRA files through compress, load, eval, inspect, the server -----------------------------------------------
@pytest.fixture
def lora_file(tiny, tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(adapter_bytes(tiny, 5, tmp_path, scale=0.05, method="lora"))
    return path


def _deltas(adapted):
    named, cfg = adapter_state(adapted.params), adapted.config
    sites = [n[: -len(lora_rank.A_KEY)] for n in named if n.endswith(lora_rank.A_KEY)]
    return {s: _delta(named, cfg, s) for s in sites}


@pytest.mark.parametrize("args", [["--scheme", "int8"], ["--scheme", "int8-channel"], ["--scheme", "int8-delta"],
                                  ["--scheme", "int4-g32"], ["--scheme", "int4-g64"], ["--rank", "2"],
                                  ["--rank", "4"], ["--rank", "1", "--scheme", "int4-g64"]])
def test_cli_compresses_a_lora_that_loads_evals_and_inspects(args, tiny, lora_file, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["compress", "--base", "tiny", "--adapter", str(lora_file), "--out", str(out), "--json", *args]) == 0
    r = json.loads(capsys.readouterr().out)
    raw, got = load_adapted(tiny, lora_file), load_adapted(tiny, out)
    scheme = args[args.index("--scheme") + 1] if "--scheme" in args else "float16"
    rank = int(args[args.index("--rank") + 1]) if "--rank" in args else 4
    assert got.meta["scheme"] == r["scheme"] == scheme and got.config.rank == r["rank"] == rank
    assert got.meta["base_fingerprint"] == tiny.fingerprint and got.meta["method_config"]["rank"] == rank
    assert got.meta["compressed_from"] == "float16" and r["bytes"] == out.stat().st_size
    d_raw, d_got = _deltas(raw), _deltas(got)
    rel = max((d_raw[s] - d_got[s]).norm() / d_raw[s].norm() for s in d_raw)
    if "--rank" in args:
        assert got.meta["truncated_from"]["rank"] == 4 and got.meta["truncated_from"]["alpha"] == 8
        assert got.n_params == raw.n_params * rank // 4
        if rank == 4:
            assert rel < 2e-3  # a re-factoring (and fp16 rounding of the new factors)
    else:
        assert "truncated_from" not in got.meta and got.n_params == raw.n_params
        assert rel < (0.02 if scheme.startswith("int8") else 0.25)
    if scheme.startswith("int4"):
        assert r["bytes"] < 0.35 * r["bytes_in"] * rank / 4 + 2048
    assert main(["inspect", str(out), "--base", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    text = tmp_path / "u.txt"
    text.write_text("a user's words, the cat sat on the mat. " * 60)
    assert main(["eval", "--base", "tiny", "--adapter", str(out), "--text", str(text), "--window", "32",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 0


def test_cli_rank_refusals(tiny, lora_file, tmp_path, capsys):
    args = ["compress", "--base", "tiny", "--adapter", str(lora_file), "--out", str(tmp_path / "o")]
    assert main(args + ["--rank", "8"]) == 2 and "rank in 1..4" in capsys.readouterr().err
    norm = tmp_path / "norm.safetensors"
    norm.write_bytes(adapter_bytes(tiny, 1, tmp_path))
    assert main(["compress", "--base", "tiny", "--adapter", str(norm), "--out", str(tmp_path / "o"),
                 "--rank", "2"]) == 2
    assert "truncates LoRA adapters" in capsys.readouterr().err
    assert main(args + ["--rank", "2", "--policy"]) == 2 and "exactly one" in capsys.readouterr().err


def test_int4_and_truncated_loras_are_served_like_the_cli_loads_them(tiny, lora_file, tmp_path, monkeypatch):
    from .test_serve import TEXT, Server, auth  # noqa: F401

    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "store")
    try:
        raw = load_adapted(tiny, lora_file)
        for i, spec in enumerate(["int4-g32", "int4-g64", "rank2+float16", "rank1+int4-g64", "int8"]):
            user = f"u{i}"
            token = s.user(user)
            data = encode_adapter(tiny, raw, spec)
            r = s.put(user, token, data)
            assert r.status_code == 200, r.text
            assert r.json()["scheme"] == spec.split("+")[-1]
            got = s.score(token).json()["logprob"]
            assert got == pytest.approx(reference_score(alone(tiny, data), text_ids(tiny, TEXT)), abs=1e-4)
        # a malformed int4 upload is refused with the parser's line, and the store keeps the last good one
        tensors, meta = wire.parse_file(encode_adapter(tiny, raw, "int4-g32"), "x")
        bad = wire.adapter_bytes({**tensors, "scales": -tensors["scales"]}, meta)
        token = s.user("w")
        r = s.put("w", token, bad)
        assert r.status_code == 400 and "scales must be finite and positive" in r.text
    finally:
        s.close()


def test_policy_tries_int4_and_rank_truncations_of_a_lora(tiny, lora_file, tmp_path):
    raw = load_adapted(tiny, lora_file)
    specs = candidate_specs(raw)
    assert specs == ["int8", "int8-channel", "int8-delta", "int4-g32", "int4-g64", "rank2+float16", "rank2+int4-g64",
                     "rank1+float16", "rank1+int4-g64"]
    tokens = torch.tensor(tiny.tokenizer.encode("the cat sat on the mat and then ran away. " * 40))
    pol = policy_for(tiny, raw, tokens, window=32, max_tokens=128, specs=["int4-g64", "rank1+int4-g64"])
    assert [r["scheme"] for r in pol["schemes"]] == ["rank1+int4-g64", "int4-g64"]  # by payload
    assert pol["tolerance"] == 0.02 and pol["decision"] in ("float16", "int4-g64", "rank1+int4-g64")
    data = encode_adapter(tiny, raw, pol["decision"], {"policy": pol})
    assert load_adapted(tiny, data=data).meta["policy"]["decision"] == pol["decision"]
