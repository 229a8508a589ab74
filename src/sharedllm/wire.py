"""Adapter files: one flat safetensors tensor plus compact JSON metadata, bound to the exact base.

Layout: the adapter's tensors (in the method's canonical order) are concatenated into one flat tensor
`adapter`; the metadata records their shapes and a sha256 of (name, shape) pairs, so a norm adapter
for the default base costs 2 x 35,136 bytes + well under 1 KiB. Loading never unpickles: safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .atomic import write_bytes_atomic
from .errors import SharedLLMError

FORMAT = "sharedllm-adapter"
FORMAT_VERSION = 1
META_KEY = "sharedllm"
MAX_HEADER = 1 << 20


def layout_of(params: dict) -> list[tuple[str, tuple]]:
    return [(name, tuple(p.shape)) for name, p in params.items()]


def layout_hash(layout) -> str:
    text = "\n".join(f"{n}:{','.join(map(str, s))}" for n, s in layout)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in state.values()])


def unflatten(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = flat[i: i + n].reshape(shape)
        i += n
    return out


def adapter_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})


def save_adapter(path, state: dict, method: str, base_fingerprint: str, info: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write an adapter file atomically; `info` (train config, loss summary...) goes into the metadata."""
    flat = flatten(state)
    if not torch.isfinite(flat).all():
        raise SharedLLMError("refusing to save an adapter with non-finite values")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "scheme": str(dtype).split(".")[-1],
            "params": flat.numel(), "base_fingerprint": base_fingerprint,
            "layout": layout_hash(layout_of(state)), "shapes": [list(t.shape) for t in state.values()],
            "version": __version__, **(info or {})}
    return write_bytes_atomic(path, adapter_bytes({"adapter": flat.to(dtype)}, meta))


# safetensors dtype name -> bytes per element (the names safetensors writes; anything else is refused)
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_GAIN = 64.0  # |value| bound for every adapter value (a norm gain of 64 is already far outside training)
# ...unless its method declares another (`Capabilities.max_value`): a full fine-tune holds the base's own weights,
# and some bases have larger ones (Qwen2's attention biases reach a few hundred): float16's range.


def value_bound(meta: dict) -> float:
    """The |value| bound of an adapter of this method (its declared `caps.max_value`; MAX_GAIN if unknown)."""
    from .adapters import METHODS

    method = METHODS.get(meta.get("method")) if isinstance(meta.get("method"), str) else None
    return method.caps.max_value if method is not None else MAX_GAIN


FLOAT_SCHEMES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}
INT8_SCHEMES = ("int8", "int8-channel", "int8-delta")


def _no_constants(name: str):
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def strict_json(text, what: str):
    """json.loads refusing NaN/Infinity, duplicate keys and invalid UTF-8; -> SharedLLMError naming `what`."""
    try:
        return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SharedLLMError(f"{what} is not valid JSON ({str(e).splitlines()[0][:80]})") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(name: str, v, source: str) -> tuple[int, int]:
    where = f"{source}: tensor {name[:40]!r}"
    if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
        raise SharedLLMError(f"{where}: header entry must have exactly dtype, shape, data_offsets")
    if not isinstance(v["dtype"], str) or v["dtype"] not in DTYPE_SIZES:
        raise SharedLLMError(f"{where}: unknown dtype {str(v['dtype'])[:20]!r}")
    shape, offs = v["shape"], v["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
        raise SharedLLMError(f"{where}: shape must be a list of non-negative integers")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) and o >= 0 for o in offs):
        raise SharedLLMError(f"{where}: data_offsets must be two non-negative integers")
    if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[v["dtype"]]:
        raise SharedLLMError(f"{where}: data_offsets {offs} do not match shape {shape} of {v['dtype']}")
    return offs[0], offs[1]


def read_header(data: bytes, source: str) -> dict:
    """Parse and check a safetensors header without touching tensor data: every entry well-formed, offsets
    contiguous and covering exactly the payload, __metadata__ a str -> str map."""
    n = _header_length(data[:8], len(data), source)
    return _checked_header(data[8: 8 + n], len(data), source)


def read_file_header(path) -> tuple[dict, dict | None]:
    """(checked header, sharedllm metadata or None) of the safetensors file at `path`, reading only its first
    8 + header bytes (at most MAX_HEADER): no tensor is loaded, the same checks as read_header + header_meta."""
    path = Path(path)
    if not path.is_file():
        raise SharedLLMError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = _header_length(f.read(8), size, str(path))
        header = _checked_header(f.read(n), size, str(path))
    return header, header_meta(header, str(path))


def _header_length(first8: bytes, size: int, source: str) -> int:
    """The header length a safetensors file of `size` bytes starts with, bounded by MAX_HEADER and the file."""
    if size < 8:
        raise SharedLLMError(f"{source}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER or 8 + n > size:
        raise SharedLLMError(f"{source}: not a safetensors file, or truncated (header length {n}, file {size})")
    return n


def _checked_header(raw: bytes, size: int, source: str) -> dict:
    """The header JSON `raw` of a file of `size` bytes, checked entry by entry against that size."""
    try:
        header = strict_json(raw, "header")
    except SharedLLMError as e:
        raise SharedLLMError(f"{source}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise SharedLLMError(f"{source}: not a safetensors file (header is not a JSON object)")
    md = header.get("__metadata__", {})
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in md.items()):
        raise SharedLLMError(f"{source}: __metadata__ must map strings to strings")
    spans = sorted(_check_entry(k, v, source) for k, v in header.items() if k != "__metadata__")
    at = 0
    for begin, end in spans:
        if begin != at:
            raise SharedLLMError(f"{source}: tensor data overlaps or leaves a gap at byte {at}")
        at = end
    if 8 + len(raw) + at != size:
        raise SharedLLMError(f"{source}: truncated or padded safetensors file (data does not match the header)")
    return header


def header_meta(header: dict, source: str):
    """The sharedllm metadata of a checked header (a JSON object), or None when it has none."""
    text = header.get("__metadata__", {}).get(META_KEY)
    if text is None:
        return None
    meta = strict_json(text, f"{source}: __metadata__.{META_KEY}")
    if not isinstance(meta, dict):
        raise SharedLLMError(f"{source}: __metadata__.{META_KEY} must be a JSON object, got {type(meta).__name__}")
    return meta


def _need(meta: dict, key: str, ok, what: str, source: str) -> None:
    if key not in meta or not ok(meta[key]):
        raise SharedLLMError(f"{source}: metadata field {key!r} must be {what} (got {str(meta.get(key))[:40]!r})")


def check_adapter_meta(meta: dict, source: str) -> None:
    """The sharedllm adapter metadata: every field the loaders read is present with the right type."""
    from .adapters import METHODS, config_from_json

    _need(meta, "format_version", lambda v: _is_int(v) and v == FORMAT_VERSION, str(FORMAT_VERSION), source)
    _need(meta, "method", lambda v: isinstance(v, str) and v in METHODS, f"one of {', '.join(sorted(METHODS))}", source)
    _need(meta, "scheme", lambda v: isinstance(v, str) and (v in FLOAT_SCHEMES or v in INT8_SCHEMES),
          f"one of {', '.join([*FLOAT_SCHEMES, *INT8_SCHEMES])}", source)
    _need(meta, "params", lambda v: _is_int(v) and 0 < v < 1 << 34, "a positive integer", source)
    for key in ("base_fingerprint", "layout"):
        _need(meta, key, lambda v: isinstance(v, str), "a string", source)
    _need(meta, "shapes", lambda v: isinstance(v, list) and all(
        isinstance(s, list) and all(_is_int(d) and 0 <= d < 1 << 34 for d in s) for s in v),
        "a list of shapes (lists of non-negative integers)", source)
    if sum(math.prod(s) for s in meta["shapes"]) != meta["params"]:
        raise SharedLLMError(f"{source}: metadata shapes hold {sum(math.prod(s) for s in meta['shapes'])} values, "
                             f"params says {meta['params']}")
    if meta["scheme"] == "int8-channel":
        _need(meta, "channel_block", lambda v: _is_int(v) and v == 64, "64", source)
    if "method_config" in meta:  # absent in files written before method configs were recorded: the default
        config_from_json(meta["method"], meta["method_config"], source)


def expected_tensors(meta: dict) -> dict[str, tuple[str, list]]:
    """name -> (safetensors dtype, shape) that an adapter file with this (checked) metadata must hold."""
    if meta["scheme"] in FLOAT_SCHEMES:
        return {"adapter": (FLOAT_SCHEMES[meta["scheme"]], [meta["params"]])}
    from .quant.adapter_int8 import _segments

    return {"adapter": ("I8", [meta["params"]]), "scales": ("F32", [len(_segments(meta["shapes"], meta["scheme"]))])}


def check_values(tensors: dict, meta: dict, source: str) -> None:
    """Finite values; every value the file itself encodes (scale x code for int8) within +-value_bound(meta)."""
    if meta["scheme"] in FLOAT_SCHEMES:
        values = tensors["adapter"].float()
    else:
        scales = tensors["scales"].float()
        if not torch.isfinite(scales).all() or not (scales > 0).all():
            raise SharedLLMError(f"{source}: int8 scales must be finite and positive")
        from .quant.adapter_int8 import _segments

        segs = torch.tensor(_segments(meta["shapes"], meta["scheme"]), dtype=torch.long)
        values = tensors["adapter"].float() * torch.repeat_interleave(scales, segs)
    if not torch.isfinite(values).all():
        raise SharedLLMError(f"{source}: adapter contains non-finite values (NaN or inf)")
    check_bound(values, source, value_bound(meta))


def check_bound(values: torch.Tensor, source: str, bound: float = MAX_GAIN) -> None:
    if values.numel() and values.abs().max() > bound:
        raise SharedLLMError(f"{source}: adapter value {values.abs().max().item():.4g} is outside the allowed "
                             f"range +-{bound:g}")


def parse_file(data: bytes, source: str, expect: str = FORMAT) -> tuple[dict, dict]:
    """bytes -> (tensors, sharedllm metadata); refuses anything that is not a well-formed sharedllm file.

    For adapters this is the one strict parser (upload, eval, inspect, compress, export all come here): header
    structure, metadata fields and types, tensor names, dtypes equal to the scheme's, shapes, finite values
    within +-value_bound (MAX_GAIN; a full fine-tune: float16's range). Every refusal is one SharedLLMError line
    naming the file and the problem."""
    header = read_header(data, source)
    meta = header_meta(header, source)
    if meta is None or not isinstance(meta.get("format"), str) or meta["format"] != expect:
        raise SharedLLMError(f"{source}: a safetensors file, but not a {expect} (no sharedllm metadata)")
    if expect == FORMAT:
        check_adapter_meta(meta, source)
        want = expected_tensors(meta)
        got = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
        if set(got) != set(want):
            raise SharedLLMError(f"{source}: scheme {meta['scheme']} expects tensors {sorted(want)}, found "
                                 f"{sorted(got)[:5]}")
        for name, (dtype, shape) in want.items():
            if got[name] != (dtype, shape):
                raise SharedLLMError(f"{source}: tensor {name!r} is {got[name][0]} {got[name][1]}, scheme "
                                     f"{meta['scheme']} needs {dtype} {shape}")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise SharedLLMError(f"{source}: unreadable safetensors data ({str(e)[:120]})") from None
    if expect == FORMAT:
        check_values(tensors, meta, source)
    return tensors, meta


def read_file(path, expect: str = FORMAT) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise SharedLLMError(f"{path}: no such file")
    return parse_file(path.read_bytes(), str(path), expect)


def decode_adapter(tensors: dict, meta: dict, layout, base_state: dict, source: str) -> dict[str, torch.Tensor]:
    """Check an adapter's layout and values against this base; return its named fp32 tensors."""
    if meta.get("layout") != layout_hash(layout) or meta.get("params") != sum(math.prod(s) for _, s in layout):
        raise SharedLLMError(f"{source}: tensor names or shapes do not match method {meta.get('method')!r} on this "
                             f"base (layout {meta.get('layout')} vs expected {layout_hash(layout)})")
    scheme = meta.get("scheme", "float16")
    if scheme in ("float16", "float32", "bfloat16"):
        if set(tensors) != {"adapter"}:
            raise SharedLLMError(f"{source}: expected one tensor named 'adapter', found {sorted(tensors)}")
        flat = tensors["adapter"].float()
    else:
        from .quant.adapter_int8 import decode

        flat = decode(tensors, meta, layout, base_state, source)
    if flat.numel() != meta["params"]:
        raise SharedLLMError(f"{source}: {flat.numel()} values, metadata says {meta['params']}")
    if not torch.isfinite(flat).all():
        raise SharedLLMError(f"{source}: adapter contains non-finite values (NaN or inf)")
    check_bound(flat, source, value_bound(meta))  # int8-delta adds the base's values: bound the sum too
    return unflatten(flat, layout)


def check_binding(meta: dict, base_fingerprint: str, source: str) -> None:
    need = meta.get("base_fingerprint")
    if need != base_fingerprint:
        raise SharedLLMError(f"{source}: adapter was trained on base {str(need)[:16]}..., but the loaded base is "
                             f"{base_fingerprint[:16]}...; an adapter only works on the exact base it was trained on")


def file_fingerprint(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
