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
