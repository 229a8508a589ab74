"""The one strict adapter-file parser (wire.parse_file): every crafted header, dtype relabelling, shape, value
and metadata mutant is refused with one SharedLLMError line; eval and inspect refuse the same files cleanly."""
import json
import struct

import pytest
import torch

from sharedllm import wire
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError

from .serve_kit import adapter_bytes


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def join(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def mutate(data: bytes, fn) -> bytes:
    header, payload = split(data)
    payload = fn(header, payload) or payload
    return join(header, payload)


def set_meta(**kw):
    def fn(h, p):
        meta = json.loads(h["__metadata__"]["sharedllm"])
        meta.update(kw)
        h["__metadata__"]["sharedllm"] = json.dumps(meta)
    return fn


def relabel(dtype):
    def fn(h, p):
        h["adapter"]["dtype"] = dtype
    return fn


def f64_as_float32(h, p):
    meta = json.loads(h["__metadata__"]["sharedllm"])
    meta["scheme"] = "float32"
    h["__metadata__"]["sharedllm"] = json.dumps(meta)
    vals = torch.frombuffer(bytearray(p), dtype=torch.float16).double()
    h["adapter"] = {"dtype": "F64", "shape": [vals.numel()], "data_offsets": [0, vals.numel() * 8]}
    return vals.numpy().tobytes()


def huge_gain(h, p):
    vals = torch.frombuffer(bytearray(p), dtype=torch.float16).clone()
    vals[3] = 65504.0
    return vals.numpy().tobytes()


def entry(**kw):
    def fn(h, p):
        h["adapter"].update(kw)
    return fn


MUTANTS = {
    "data_offsets 5": (entry(data_offsets=5), "data_offsets"),
    "data_offsets []": (entry(data_offsets=[]), "data_offsets"),
    "data_offsets [0, x]": (entry(data_offsets=[0, "x"]), "data_offsets"),
    "data_offsets 3": (entry(data_offsets=[0, 640, 1]), "data_offsets"),
    "shape [2, 160]": (entry(shape=[2, 160]), "needs F16 \\[320\\]"),
    "unknown dtype": (relabel("F17"), "unknown dtype"),
    "F16 as I16": (relabel("I16"), "is I16"),
    "F16 as BF16": (relabel("BF16"), "is BF16"),
    "F16 as BOOL": (entry(dtype="BOOL", shape=[640]), "is BOOL"),
    "F64 under float32": (f64_as_float32, "is F64"),
    "fp16 65504 gain": (huge_gain, "outside the allowed range"),
    "metadata a number": (lambda h, p: h["__metadata__"].update(sharedllm="5"), "must be a JSON object"),
    "metadata bad JSON": (lambda h, p: h["__metadata__"].update(sharedllm="{\"format\": "), "not valid JSON"),
    "metadata NaN": (lambda h, p: h["__metadata__"].update(sharedllm='{"a": NaN}'), "not valid JSON"),
    "metadata value int": (lambda h, p: h["__metadata__"].update(x=5), "strings to strings"),
    "params a string": (set_meta(params="320"), "'params'"),
    "params mismatch": (set_meta(params=321), "params says 321"),
    "shapes wrong": (set_meta(shapes=[[2, "x"]]), "'shapes'"),
    "unknown scheme": (set_meta(scheme="float8"), "'scheme'"),
    "unknown method": (set_meta(method="magic"), "'method'"),
    "format_version 2": (set_meta(format_version=2), "'format_version'"),
    "fingerprint a number": (set_meta(base_fingerprint=5), "'base_fingerprint'"),
    "extra tensor": (lambda h, p: (h.update(extra={"dtype": "U8", "shape": [1], "data_offsets": [640, 641]}),
                                   p + b"\0")[1], "expects tensors"),
    "NaN value": (lambda h, p: bytes(2) + b"\x00\x7e" + p[4:], "non-finite"),
    # issue 34: tensors longer or shorter than their shape through data_offsets (refused before, kept as cases)
    "offsets 2 bytes longer": (lambda h, p: (entry(data_offsets=[0, 642])(h, p), p + bytes(2))[1],
                               "do not match shape"),
    "offsets 2 bytes shorter": (lambda h, p: (entry(data_offsets=[0, 638])(h, p), p[:-2])[1], "do not match shape"),
    "shape and offsets 1 longer": (lambda h, p: (entry(shape=[321], data_offsets=[0, 642])(h, p), p + bytes(2))[1],
                                   "needs F16 \\[320\\]"),
    # issue 34: lone surrogates, unknown fields, versions
    "surrogate version": (set_meta(version="\ud800"), "field 'version' holds a lone surrogate"),
    "surrogate layout": (set_meta(layout="\udfff"), "field 'layout' holds a lone surrogate"),
    "surrogate nested value": (set_meta(train={"lr": 1e-3, "note": ["ok", "a\udc00"]}),
                               "field 'train'/'note'/1 holds a lone surrogate"),
    "surrogate nested key": (set_meta(loss={"first\ud801": 1.0}), "a key of field 'loss' holds a lone surrogate"),
    "surrogate top-level key": (set_meta(**{"\udbff": 1}), "a top-level key holds a lone surrogate"),
    "surrogate in another __metadata__ key": (lambda h, p: h["__metadata__"].update({"x\ud800": "y"}),
                                              "header a key of field '__metadata__' holds a lone surrogate"),
    "surrogate tensor name": (lambda h, p: h.update({"\ud800": h.pop("adapter")}),
                              "header a top-level key holds a lone surrogate"),
    "unknown field": (set_meta(zzz=1), "unknown metadata field 'zzz'; an adapter file holds only"),
    "unknown fields": (set_meta(a=1, b=2, c=3, d=4), "unknown metadata fields 'a', 'b', 'c' \\(\\+1 more\\)"),
    "version a number": (set_meta(version=5), "'version' must be a package version"),
    "version junk": (set_meta(version="x" * 500), "'version' must be a package version"),
    "version with a newline": (set_meta(version="0.1.0\n"), "'version' must be a package version"),
    "version in other digits": (set_meta(version="\u0661.\u0662.\u0663"), "'version' must be a package version"),
}


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    return adapter_bytes(tiny, 1, tmp_path_factory.mktemp("good"))


def test_the_good_file_parses(good):
    tensors, meta = wire.parse_file(good, "good")
    assert tensors["adapter"].dtype == torch.float16 and meta["params"] == 320


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_is_refused_with_one_line(good, name):
    fn, needle = MUTANTS[name]
    with pytest.raises(SharedLLMError, match=needle) as e:
        wire.parse_file(mutate(good, fn), "mutant.safetensors")
    assert "mutant.safetensors" in str(e.value) and "\n" not in str(e.value)
    str(e.value).encode("utf-8")  # no lone surrogate in the line itself: a JSON 4xx or a terminal can carry it


@pytest.mark.parametrize("name", ["F16 as I16", "shape [2, 160]", "metadata bad JSON", "fp16 65504 gain",
                                  "extra tensor", "NaN value", "metadata a number"])
def test_eval_and_inspect_refuse_the_same_files_without_a_traceback(good, name, tmp_path, capsys, user_text):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutate(good, MUTANTS[name][0]))
    assert main(["eval", "--text", str(user_text), "--adapter", str(path), "--base", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert main(["inspect", str(path)]) != 0
    out = capsys.readouterr()
    assert "INVALID" in out.out + out.err and "Traceback" not in out.err


def test_inspect_of_a_good_file_is_valid(good, tmp_path, capsys):
    path = tmp_path / "good.safetensors"
    path.write_bytes(good)
    assert main(["inspect", str(path)]) == 0
    assert "INVALID" not in capsys.readouterr().out


HEADER_MUTANTS = ["data_offsets 5", "data_offsets 3", "unknown dtype", "metadata bad JSON", "metadata NaN",
                  "metadata a number", "metadata value int"]


def test_the_header_only_reader_reads_what_the_parser_reads(good, tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(good)
    header, meta = wire.read_file_header(path)
    assert header == wire.read_header(good, "good") and meta == wire.parse_file(good, "good")[1]


@pytest.mark.parametrize("name", HEADER_MUTANTS)
def test_the_header_only_reader_refuses_bad_headers_with_one_line(good, name, tmp_path):
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(mutate(good, MUTANTS[name][0]))
    with pytest.raises(SharedLLMError, match=MUTANTS[name][1]) as e:
        wire.read_file_header(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("data, needle", [(b"\x01\x02", "only 2 bytes"),
                                          (struct.pack("<Q", wire.MAX_HEADER + 1) + b"{}", "header length"),
                                          (struct.pack("<Q", 1 << 62) + b"{}", "header length"),
                                          (struct.pack("<Q", 50) + b"{}", "truncated")])
def test_the_header_only_reader_bounds_the_header(data, needle, tmp_path):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(data)
    with pytest.raises(SharedLLMError, match=needle):
        wire.read_file_header(path)


def test_the_header_only_reader_refuses_a_truncated_payload(good, tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(good[:-2])
    with pytest.raises(SharedLLMError, match="truncated or padded"):
        wire.read_file_header(path)
    with pytest.raises(SharedLLMError, match="no such file"):
        wire.read_file_header(tmp_path / "absent.safetensors")


def test_int8_scales_must_be_positive_and_finite(good, tiny):
    from sharedllm.quant.compress import encoded

    tensors, meta = wire.parse_file(good, "good")
    layout = [(f"t{i}", tuple(s)) for i, s in enumerate(meta["shapes"])]
    data = encoded(tensors["adapter"].float(), layout, {}, meta, "int8")
    assert wire.parse_file(data, "int8")[1]["scheme"] == "int8"
    t = wire.parse_file(data, "int8")[0]
    for bad in (float("nan"), 0.0, -1.0, 1.0):  # 1.0 x 127 is over the +-64 bound
        scales = t["scales"].clone()
        scales[0] = bad
        with pytest.raises(SharedLLMError, match="scales|outside"):
            wire.parse_file(wire.adapter_bytes({"adapter": t["adapter"], "scales": scales}, meta | {
                "scheme": "int8"}), "int8")


def test_a_full_fine_tune_may_hold_the_bases_large_weights_a_norm_adapter_may_not(tiny, tmp_path):
    """Qwen2's attention biases reach a few hundred, so a full fine-tune of it holds values far past the +-64 that
    bounds norm and LoRA values (the 0.5B full fine-tunes failed to save before); it is bounded by float16's range."""
    from sharedllm.personalise import load_adapted, new_adapter, save_adapted

    full = new_adapter(tiny, "full")
    name = next(iter(full.params))
    with torch.no_grad():
        full.params[name].view(-1)[0] = 211.0
    path = save_adapted(full, tmp_path / "full.safetensors", tiny)
    assert load_adapted(tiny, path).params[name].view(-1)[0].item() == 211.0
    norm = new_adapter(tiny, "norm")
    with torch.no_grad():
        next(iter(norm.params.values())).view(-1)[0] = 211.0
    norm_path = save_adapted(norm, tmp_path / "norm.safetensors", tiny)
    with pytest.raises(SharedLLMError, match=r"outside the allowed range \+-64"):
        load_adapted(tiny, norm_path)
    with torch.no_grad():
        full.params[name].view(-1)[0] = 7e4
    big = save_adapted(full, tmp_path / "full2.safetensors", tiny, dtype=torch.float32)
    with pytest.raises(SharedLLMError, match=r"outside the allowed range \+-65504"):
        load_adapted(tiny, big)


# ---- issue 34: what sharedllm writes parses; versions; shapes against the layout; data order ------------------
@pytest.mark.parametrize("version", ["0.1.0", "0.0.1", "1.2.3rc1", "0.2.0.dev3", "0.1.0+local.7", "10.20.30.40"])
def test_plausible_versions_parse(good, version):
    assert wire.parse_file(mutate(good, set_meta(version=version)), "v")[1]["version"] == version


def test_a_file_without_a_version_and_valid_non_ascii_strings_parse(good):
    no_version = mutate(good, lambda h, p: h["__metadata__"].update(sharedllm=json.dumps(
        {k: v for k, v in json.loads(h["__metadata__"]["sharedllm"]).items() if k != "version"})))
    assert "version" not in wire.parse_file(no_version, "old")[1]
    text = "caf\u00e9 \U0001F600"  # JSON writes the emoji as a surrogate *pair*: one valid code point
    assert wire.parse_file(mutate(good, set_meta(user_text=text)), "u")[1]["user_text"] == text


def test_every_field_sharedllm_writes_is_known_and_its_files_parse(tiny, tmp_path):
    from sharedllm.personalise import personalise, save_adapted
    from sharedllm.quant.compress import encode_adapter
    from sharedllm.train import TrainConfig

    ids = torch.arange(200) % 50
    adapted = personalise(tiny, ids, "norm", TrainConfig(steps=1, batch=1, seq=16), dtype="bf16")
    path = save_adapted(adapted, tmp_path / "a.safetensors", tiny,
                        info={"user": "ann", "user_text": "ann.txt", "derived": "mix", "compute_dtype": "bf16"})
    meta = wire.read_file(path)[1]
    written = set(meta)
    for scheme in ("float16", *wire.INT8_SCHEMES):
        from sharedllm.personalise import load_adapted

        data = encode_adapter(tiny, load_adapted(tiny, path), scheme, {"policy": {"decision": scheme}})
        written |= set(wire.parse_file(data, scheme)[1])
    for dtype in (torch.float32, torch.bfloat16):
        written |= set(wire.read_file(save_adapted(adapted, tmp_path / f"{dtype}.safetensors", tiny, dtype=dtype))[1])
    from sharedllm.choose import with_choice  # a rank-truncated LoRA (truncated_from), adapt --method auto (choice)

    lora = save_adapted(personalise(tiny, ids, "lora", TrainConfig(steps=1, batch=1, seq=16)), tmp_path / "l", tiny)
    written |= set(wire.parse_file(encode_adapter(tiny, load_adapted(tiny, lora), "rank2+int4-g32"), "r")[1])
    written |= set(wire.parse_file(with_choice(lora.read_bytes(), {"chosen": "lora-r4"}), "c")[1])
    from sharedllm.quant import lora_joint  # a joint core file (compress --joint: joint)

    one = load_adapted(tiny, lora)
    _, cores, errors = lora_joint.compress_cohort({"u": one}, 2)
    written |= set(wire.parse_file(lora_joint.core_bytes(one, cores["u"], "0" * 64, 2, errors["u"]), "j")[1])
    from sharedllm import stack  # a hierarchical adapter's per-user part (adapt --on-top: on_top)
    from sharedllm.personalise import new_adapter, stacked_base

    group = lora.read_bytes()
    stacked = stacked_base(tiny, group, "g")
    part = save_adapted(new_adapter(stacked, "norm"), tmp_path / "part.safetensors", stacked,
                        info=stack.on_top_meta(lora, stacked))
    written |= set(wire.read_file(part)[1])
    assert written == wire.KNOWN_META_FIELDS  # every known field is one sharedllm writes, and only those


def _reshaped(data: bytes, shapes) -> bytes:
    return mutate(data, set_meta(shapes=shapes))


@pytest.mark.parametrize("scheme", ["float16", "int8", "int8-delta"])
def test_metadata_shapes_that_move_tensor_boundaries_are_refused_on_load(tiny, good, scheme):
    """Same layout hash, same total: tensor 0 would be read 16 values longer and tensor 1 16 shorter."""
    from sharedllm.personalise import load_adapted
    from sharedllm.quant.compress import encode_adapter

    data = good if scheme == "float16" else encode_adapter(tiny, load_adapted(tiny, data=good, source="g"), scheme)
    shapes = wire.parse_file(data, "d")[1]["shapes"]
    moved = [[shapes[0][0] + 16], [shapes[1][0] - 16], *shapes[2:]]
    wire.parse_file(_reshaped(data, moved), "moved")  # the base-free parser cannot tell...
    with pytest.raises(SharedLLMError, match="metadata shapes do not match method 'norm' on this base: tensor 0 "
                                             "is \\[80\\], the base's is \\[64\\]") as e:
        load_adapted(tiny, data=_reshaped(data, moved), source="moved")  # ...loading on the base does
    assert "\n" not in str(e.value)
    with pytest.raises(SharedLLMError, match="metadata shapes do not match|needs F32 \\[1\\]"):  # int8: 1 scale
        load_adapted(tiny, data=_reshaped(data, [[sum(s[0] for s in shapes)]]), source="one")


def _int8(good, tiny, scheme="int8"):
    from sharedllm.personalise import load_adapted
    from sharedllm.quant.compress import encode_adapter

    return encode_adapter(tiny, load_adapted(tiny, data=good, source="g"), scheme)


def test_int8_data_out_of_its_written_order_is_refused(good, tiny):
    def swap(h, p):  # the scales' and the codes' offsets exchanged, the payload left as it is
        n = h["adapter"]["data_offsets"][1] - h["adapter"]["data_offsets"][0]
        h["adapter"]["data_offsets"], h["scales"]["data_offsets"] = [0, n], [n, len(p)]
    data = _int8(good, tiny)
    assert wire.parse_file(data, "ok")[1]["scheme"] == "int8"
    with pytest.raises(SharedLLMError, match="tensor data out of order: scheme int8 stores scales, adapter"):
        wire.parse_file(mutate(data, swap), "swapped")


@pytest.mark.parametrize("scheme", wire.INT8_SCHEMES)
def test_an_int8_file_is_dequantised_once_per_load(good, tiny, scheme, monkeypatch):
    from sharedllm.personalise import load_adapted

    data, calls = _int8(good, tiny, scheme), []
    real = wire.codes_times_scales
    monkeypatch.setattr(wire, "codes_times_scales", lambda *a: calls.append(1) or real(*a))
    loaded = load_adapted(tiny, data=data, source="i")
    assert len(calls) == 1
    tensors, meta = wire.parse_file(data, "i")
    layout = wire.layout_of(loaded.params)
    base_state = dict(tiny.model.named_parameters())
    kept = wire.decode_adapter(tensors, meta, layout, base_state, "i")
    fresh = wire.decode_adapter(dict(tensors), meta, layout, base_state, "i")  # a plain dict: decoded here
    assert len(calls) == 3 and all(torch.equal(kept[n], fresh[n]) and torch.equal(kept[n], p.detach())
                                   for n, p in loaded.params.items())


def test_kept_values_are_not_used_once_the_tensors_change(good, tiny):
    from sharedllm.personalise import new_adapter

    tensors, meta = wire.parse_file(_int8(good, tiny), "i")
    layout = wire.layout_of(new_adapter(tiny, "norm").params)
    first = layout[0][0]
    before = wire.decode_adapter(tensors, meta, layout, {}, "i")[first]
    assert tensors.kept_values() is not None
    tensors["scales"] = tensors["scales"] / 2
    assert tensors.kept_values() is None
    assert torch.allclose(wire.decode_adapter(tensors, meta, layout, {}, "i")[first], before / 2)
