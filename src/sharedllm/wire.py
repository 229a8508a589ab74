"""Adapter files: one flat safetensors tensor plus compact JSON metadata, bound to the exact base.

Layout: the adapter's tensors (in the method's canonical order) are concatenated into one flat tensor
`adapter`; the metadata records their shapes and a sha256 of (name, shape) pairs, so a norm adapter
for the default base costs 2 x 35,136 bytes + well under 1 KiB. Loading never unpickles: safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
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
CHANNEL_BLOCK = 64  # int8-channel: one scale per block of this many values of a 1-D vector
# int4 group-wise: scheme -> group size (consecutive values of one tensor sharing one fp16 scale and fp16 offset)
INT4_GROUPS = {"int4-g32": 32, "int4-g64": 64}
INT4_SCHEMES = tuple(INT4_GROUPS)
QUANT_SCHEMES = (*INT8_SCHEMES, *INT4_SCHEMES)

# Every top-level metadata field sharedllm writes into an adapter file; a file with any other is refused.
KNOWN_META_FIELDS = frozenset({
    # save_adapter: the format, the binding to the base, the package version
    "format", "format_version", "method", "scheme", "params", "base_fingerprint", "layout", "shapes", "version",
    # personalise.save_adapted and train_meta (fleet.py's members too): method config, training record, loss, dtype
    "method_config", "train", "loss", "compute_dtype",
    # commands/adapt.py, commands/adapt_many.py: the user and the text that trained it; bets/context.py: derived
    "user", "user_text", "derived",
    # quant: int8-channel's block (adapter_int8.encode), the scheme re-encoded from (compress.encoded), and
    # the policy's decision (sharedllm compress --policy)
    "channel_block", "compressed_from", "policy",
    # quant/lora_rank.py: the rank and alpha a rank-truncated LoRA came from (sharedllm compress --rank);
    # choose.py: the per-user format choice, its table and rule (sharedllm adapt --method auto)
    "truncated_from", "choice",
    # quant/lora_joint.py: a core file of a jointly compressed LoRA cohort (sharedllm compress --joint)
    "joint",
    # stack.py: a per-user adapter trained on top of a group adapter (sharedllm adapt --on-top GROUP)
    "on_top",
})
# `version` (__version__ of the writer): digits and dots, an optional short suffix (0.1.0, 1.2.3rc1, 0.2.0+local)
VERSION_FORM = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){1,3}([.+-]?[A-Za-z0-9]{1,16}){0,3}", re.ASCII)
MAX_VERSION_CHARS = 40
# a code point in U+D800..U+DFFF is a lone surrogate: json.loads joins a valid pair (\ud83d\ude00) into one
_SURROGATE = re.compile("[\ud800-\udfff]")


def plausible_version(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_VERSION_CHARS and VERSION_FORM.fullmatch(v) is not None


def _shown(key) -> str:
    """A key or path part as it may appear in an error line: ASCII, quoted, at most ~40 characters."""
    text = ascii(str(key))
    return text if len(text) <= 42 else text[:40] + "...'"


def surrogate_at(obj) -> str | None:
    """Where a decoded JSON value first holds a lone surrogate (in a key or a string, at any depth, in document
    order): e.g. "field 'version'", "field 'train'/'lr'", "a key of field 'train'"; None when it holds none."""
    stack = [(None, obj, [])]
    while stack:  # iterative: no depth limit of its own (json.loads already bounds the depth)
        key, x, path = stack.pop()
        if key is not None and _SURROGATE.search(key):
            return f"a key of field {'/'.join(path[:-1])}" if len(path) > 1 else "a top-level key"
        if isinstance(x, str) and _SURROGATE.search(x):
            return f"field {'/'.join(path)}" if path else "the value"
        if isinstance(x, dict):
            stack.extend((k, v, path + [_shown(k)]) for k, v in reversed(list(x.items())))
        elif isinstance(x, list):
            stack.extend((None, v, path + [str(i)]) for i, v in reversed(list(enumerate(x))))
    return None


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
    where = surrogate_at(header)
    if where is not None:
        raise SharedLLMError(f"{source}: not a safetensors file (header {where} holds a lone surrogate; every "
                             "string must be valid Unicode)")
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
    where = surrogate_at(meta)
    if where is not None:
        raise SharedLLMError(f"{source}: metadata {where} holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape); every string must be valid Unicode")
    return meta


def _need(meta: dict, key: str, ok, what: str, source: str) -> None:
    if key not in meta or not ok(meta[key]):
        raise SharedLLMError(f"{source}: metadata field {key!r} must be {what} (got {str(meta.get(key))[:40]!r})")


def check_adapter_meta(meta: dict, source: str) -> None:
    """The sharedllm adapter metadata: every field the loaders read is present with the right type, no field
    outside KNOWN_META_FIELDS, and `version` (when present: hand-made files may leave it out) plausible."""
    from .adapters import METHODS, config_from_json

    _need(meta, "format_version", lambda v: _is_int(v) and v == FORMAT_VERSION, str(FORMAT_VERSION), source)
    _no_unknown_fields(meta, source)
    _need(meta, "method", lambda v: isinstance(v, str) and v in METHODS, f"one of {', '.join(sorted(METHODS))}", source)
    _need(meta, "scheme", lambda v: isinstance(v, str) and (v in FLOAT_SCHEMES or v in QUANT_SCHEMES),
          f"one of {', '.join([*FLOAT_SCHEMES, *QUANT_SCHEMES])}", source)
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
        _need(meta, "channel_block", lambda v: _is_int(v) and v == CHANNEL_BLOCK, str(CHANNEL_BLOCK), source)
    if "method_config" in meta:  # absent in files written before method configs were recorded: the default
        config_from_json(meta["method"], meta["method_config"], source)
    if "joint" in meta:
        _check_joint(meta, source)
    if "on_top" in meta:
        _need(meta, "on_top", lambda v: isinstance(v, dict) and set(v) == {"sha256", "file", "method"}
              and isinstance(v["sha256"], str) and SHA256_FORM.fullmatch(v["sha256"]) is not None
              and isinstance(v["file"], str) and 0 < len(v["file"]) <= 255 and "/" not in v["file"]
              and "\\" not in v["file"] and v["file"] not in (".", "..") and isinstance(v["method"], str)
              and v["method"] in METHODS, "{sha256: 64 hex digits, file: a plain file name, method: a method}",
              source)
    if "version" in meta:
        _need(meta, "version", plausible_version, f"a package version like 0.1.0 (digits and dots, at most "
              f"{MAX_VERSION_CHARS} characters)", source)


# A joint core file (quant/lora_joint.py): `joint` names the cohort's shared bases by their file's sha256 and
# records the joint rank K (every tensor of the file is a K x K core), the source LoRA's rank and alpha, and the
# user's relative error; its method_config is the LoRA it materialises (rank min(K, source rank)).
MAX_JOINT_RANK = 64
JOINT_FIELDS = ("shared_sha256", "rank", "source_rank", "source_alpha", "rel_error")
SHA256_FORM = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_joint(meta: dict, source: str) -> None:
    j = meta["joint"]
    if not isinstance(j, dict) or set(j) != set(JOINT_FIELDS):
        raise SharedLLMError(f"{source}: metadata field 'joint' must be an object with exactly the fields "
                             f"{', '.join(JOINT_FIELDS)}")
    checks = {"shared_sha256": (lambda v: isinstance(v, str) and SHA256_FORM.fullmatch(v) is not None,
                                "a sha256 (64 lowercase hex digits)"),
              "rank": (lambda v: _is_int(v) and 1 <= v <= MAX_JOINT_RANK, f"an integer in 1..{MAX_JOINT_RANK}"),
              "source_rank": (lambda v: _is_int(v) and 1 <= v <= 4096, "an integer in 1..4096"),
              "source_alpha": (lambda v: _is_number(v) and v > 0, "a positive number"),
              "rel_error": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")}
    for key, (ok, what) in checks.items():
        if not ok(j[key]):
            raise SharedLLMError(f"{source}: metadata field 'joint'/{key!r} must be {what} (got {str(j[key])[:40]!r})")
    k, cfg = j["rank"], meta.get("method_config")
    from .adapters import METHODS

    low_rank = meta["method"] in METHODS and METHODS[meta["method"]].caps.low_rank
    if not low_rank or not isinstance(cfg, dict) or cfg.get("rank") != min(k, j["source_rank"]):
        raise SharedLLMError(f"{source}: a joint core file must be method 'lora' with a method_config of rank "
                             f"min(joint rank, source rank) = {min(k, j['source_rank'])}")
    if any(s != [k, k] for s in meta["shapes"]):
        raise SharedLLMError(f"{source}: a joint core file of rank {k} holds {k} x {k} cores only (metadata shapes)")


def _no_unknown_fields(meta: dict, source: str) -> None:
    unknown = sorted(set(meta) - KNOWN_META_FIELDS)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise SharedLLMError(f"{source}: unknown metadata field{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(_shown(k) for k in unknown[:3])}{more}; an adapter file holds only "
                             f"{', '.join(sorted(KNOWN_META_FIELDS))}")


# ---- int8 schemes: the file-format part (how codes, scales and shapes give values; quantising is in
# quant/adapter_int8.py). `adapter` holds int8 codes, `scales` one fp32 scale per segment: a run of the flat
# tensor (a whole tensor; int8-channel: a row of a >= 2-D tensor, a block of CHANNEL_BLOCK of a 1-D one).
def segments(shapes: list, scheme: str) -> list[int]:
    """Lengths of the consecutive runs of the flat tensor that share one scale."""
    segs = []
    for shape in shapes:
        n = math.prod(shape)
        if scheme in INT4_GROUPS:  # groups of G consecutive values within each tensor (its last one shorter)
            g = INT4_GROUPS[scheme]
            segs += [g] * (n // g) + ([n % g] if n % g else [])
        elif scheme != "int8-channel":
            segs.append(n)
        elif len(shape) >= 2:
            segs += [n // shape[0]] * shape[0]
        else:
            segs += [CHANNEL_BLOCK] * (n // CHANNEL_BLOCK) + ([n % CHANNEL_BLOCK] if n % CHANNEL_BLOCK else [])
    return segs


def int8_reference(layout, base_state: dict | None, scheme: str) -> torch.Tensor:
    """What the codes are relative to: zero, or (int8-delta) the base's own tensors (zero where it has none)."""
    n = sum(math.prod(s) for _, s in layout)
    if scheme != "int8-delta":
        return torch.zeros(n)
    if base_state is None:
        raise SharedLLMError("int8-delta needs the base's tensors")
    parts = []
    for name, shape in layout:
        b = base_state.get(name)
        ok = b is not None and tuple(b.shape) == tuple(shape)
        parts.append(b.detach().float().cpu().reshape(-1) if ok else torch.zeros(math.prod(shape)))
    return torch.cat(parts) if parts else torch.zeros(0)


def check_int8_scheme(scheme, source: str) -> None:
    if scheme not in INT8_SCHEMES:
        raise SharedLLMError(f"{source}: unknown adapter scheme {scheme!r}; known: float16, float32, "
                             f"{', '.join(QUANT_SCHEMES)}")


def codes_times_scales(codes: torch.Tensor, scales: torch.Tensor, segs: list[int]) -> torch.Tensor:
    """code x its segment's scale, flat fp32 (int8-delta's base reference not yet added)."""
    return codes.float() * torch.repeat_interleave(scales.float(), torch.tensor(segs, dtype=torch.long))


def decode_int8(tensors: dict, meta: dict, layout, base_state: dict | None, source: str) -> torch.Tensor:
    """An int8 file's tensors -> its flat fp32 adapter on `layout`, refusing anything malformed (for tensors that
    did not come through parse_file, which checks all of this once)."""
    scheme = meta.get("scheme")
    check_int8_scheme(scheme, source)
    if set(tensors) != {"adapter", "scales"}:
        raise SharedLLMError(f"{source}: scheme {scheme} expects tensors 'adapter' and 'scales', found "
                             f"{sorted(tensors)}")
    q, scales = tensors["adapter"], tensors["scales"]
    if q.dtype != torch.int8 or q.dim() != 1:
        raise SharedLLMError(f"{source}: 'adapter' must be a flat int8 tensor for scheme {scheme}, got {q.dtype}")
    if scheme == "int8-channel" and meta.get("channel_block") != CHANNEL_BLOCK:
        raise SharedLLMError(f"{source}: channel_block {meta.get('channel_block')}, expected {CHANNEL_BLOCK}")
    segs = segments([s for _, s in layout], scheme)
    if q.numel() != sum(segs) or scales.numel() != len(segs):
        raise SharedLLMError(f"{source}: {q.numel()} values and {scales.numel()} scales; the layout needs "
                             f"{sum(segs)} and {len(segs)}")
    return codes_times_scales(q, scales, segs) + int8_reference(layout, base_state, scheme)


# ---- int4 group-wise schemes (int4-g32, int4-g64): the file-format part (the quantiser is quant/adapter_int4.py).
# `adapter` is U8 [ceil(params / 2)], two codes 0..15 per byte (value 2i in the low nibble, 2i+1 in the high one;
# an odd count leaves the last high nibble 0); `scales` and `offsets` are F16, one per group (segments): a value is
# offset + code x scale, asymmetric so that gains near 1.0 (norm, ia3) use all 16 levels, not half of them.
def check_int4_scheme(scheme, source: str) -> int:
    """The group size of an int4 scheme; refuses any other scheme."""
    if scheme not in INT4_GROUPS:
        raise SharedLLMError(f"{source}: unknown int4 scheme {scheme!r}; known: {', '.join(INT4_SCHEMES)}")
    return INT4_GROUPS[scheme]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [n] -> U8 [ceil(n / 2)] (low nibble first)."""
    c = codes.to(torch.uint8).reshape(-1)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return c[0::2] | (c[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int, source: str) -> torch.Tensor:
    """U8 [ceil(n / 2)] -> codes [n] (uint8, 0..15); an odd n's unused last nibble must be 0."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 1) // 2:
        raise SharedLLMError(f"{source}: int4 'adapter' must be flat uint8 of {(n + 1) // 2} bytes for {n} values, "
                             f"got {packed.dtype} {list(packed.shape)}")
    if n % 2 and n and int(packed[-1]) >> 4:
        raise SharedLLMError(f"{source}: int4 padding nibble (the high half of the last byte) must be 0, got "
                             f"{int(packed[-1]) >> 4}")
    return torch.stack([packed & 0x0F, packed >> 4], 1).reshape(-1)[:n]


def int4_values(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, segs: list[int],
                source: str) -> torch.Tensor:
    """offset + code x scale per group, flat fp32; scales finite and positive, offsets finite, one per group."""
    for name, t in (("scales", scales), ("offsets", offsets)):
        if t.dtype != torch.float16 or t.dim() != 1 or t.numel() != len(segs):
            raise SharedLLMError(f"{source}: int4 {name!r} must be flat float16 with one value per group "
                                 f"({len(segs)}), got {t.dtype} {list(t.shape)}")
    s, o = scales.float(), offsets.float()
    if not torch.isfinite(s).all() or not (s > 0).all():
        raise SharedLLMError(f"{source}: int4 scales must be finite and positive")
    if not torch.isfinite(o).all():
        raise SharedLLMError(f"{source}: int4 offsets must be finite")
    codes = unpack_nibbles(packed, sum(segs), source)
    reps = torch.tensor(segs, dtype=torch.long)
    return torch.repeat_interleave(o, reps) + codes.float() * torch.repeat_interleave(s, reps)


def decode_int4(tensors: dict, meta: dict, layout, source: str) -> torch.Tensor:
    """An int4 file's tensors -> its flat fp32 adapter on `layout`, refusing anything malformed (for tensors that
    did not come through parse_file, which checks all of this once)."""
    scheme = meta.get("scheme")
    check_int4_scheme(scheme, source)
    if set(tensors) != {"adapter", "scales", "offsets"}:
        raise SharedLLMError(f"{source}: scheme {scheme} expects tensors 'adapter', 'scales' and 'offsets', found "
                             f"{sorted(tensors)}")
    segs = segments([s for _, s in layout], scheme)
    return int4_values(tensors["adapter"], tensors["scales"], tensors["offsets"], segs, source)


def expected_tensors(meta: dict) -> dict[str, tuple[str, list]]:
    """name -> (safetensors dtype, shape) that an adapter file with this (checked) metadata must hold, in the
    order of their data (safetensors writes the wider dtype first: an int8 file's scales, then its codes; an
    int4 file's offsets, scales, then its packed codes)."""
    if meta["scheme"] in FLOAT_SCHEMES:
        return {"adapter": (FLOAT_SCHEMES[meta["scheme"]], [meta["params"]])}
    if meta["scheme"] in INT4_GROUPS:
        groups = [len(segments(meta["shapes"], meta["scheme"]))]
        return {"offsets": ("F16", groups), "scales": ("F16", groups), "adapter": ("U8", [(meta["params"] + 1) // 2])}
    return {"scales": ("F32", [len(segments(meta["shapes"], meta["scheme"]))]), "adapter": ("I8", [meta["params"]])}


def _check_tensors(header: dict, meta: dict, source: str) -> None:
    """The header's tensors are exactly the scheme's: names, dtypes, shapes, and the order of their data."""
    want = expected_tensors(meta)
    got = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if set(got) != set(want):
        raise SharedLLMError(f"{source}: scheme {meta['scheme']} expects tensors {sorted(want)}, found "
                             f"{sorted(got)[:5]}")
    for name, (dtype, shape) in want.items():
        if got[name] != (dtype, shape):
            raise SharedLLMError(f"{source}: tensor {name!r} is {got[name][0]} {got[name][1]}, scheme "
                                 f"{meta['scheme']} needs {dtype} {shape}")
    order = [name for _, name in sorted((header[name]["data_offsets"], name) for name in want)]
    if order != list(want):
        raise SharedLLMError(f"{source}: tensor data out of order: scheme {meta['scheme']} stores "
                             f"{', '.join(want)} in that order, this file {', '.join(order)}")


def file_values(tensors: dict, meta: dict, source: str) -> torch.Tensor:
    """The flat values a checked file itself encodes: its float tensor, code x scale (int8; int8-delta's base
    reference is added by decode_adapter), or offset + code x scale (int4). Scales must be finite and positive
    (int4 offsets finite, its padding nibble 0)."""
    if meta["scheme"] in FLOAT_SCHEMES:
        return tensors["adapter"].float()
    if meta["scheme"] in INT4_GROUPS:
        return int4_values(tensors["adapter"], tensors["scales"], tensors["offsets"],
                           segments(meta["shapes"], meta["scheme"]), source)
    scales = tensors["scales"].float()
    if not torch.isfinite(scales).all() or not (scales > 0).all():
        raise SharedLLMError(f"{source}: int8 scales must be finite and positive")
    return codes_times_scales(tensors["adapter"], scales, segments(meta["shapes"], meta["scheme"]))


def check_values(tensors: dict, meta: dict, source: str) -> torch.Tensor:
    """Finite values; every value the file itself encodes (scale x code for int8) within +-value_bound(meta).
    -> those values (file_values), so that the file is dequantised once."""
    values = file_values(tensors, meta, source)
    if not torch.isfinite(values).all():
        raise SharedLLMError(f"{source}: adapter contains non-finite values (NaN or inf)")
    check_bound(values, source, value_bound(meta))
    return values


def check_bound(values: torch.Tensor, source: str, bound: float = MAX_GAIN) -> None:
    if values.numel() and values.abs().max() > bound:
        raise SharedLLMError(f"{source}: adapter value {values.abs().max().item():.4g} is outside the allowed "
                             f"range +-{bound:g}")


class ParsedTensors(dict):
    """parse_file's tensors (name -> tensor, exactly as safetensors loads them) and, for an adapter, the flat
    values the file encodes (`file_values`), kept so that decode_adapter does not dequantise the file again."""

    def __init__(self, tensors: dict, values: torch.Tensor):
        super().__init__(tensors)
        self._values, self._of = values, list(tensors.items())

    def kept_values(self) -> torch.Tensor | None:
        """The kept values, or None once the dict no longer holds the very tensors they were computed from."""
        now = list(self.items())
        same = len(now) == len(self._of) and all(k == j and t is u for (k, t), (j, u) in zip(now, self._of))
        return self._values if same else None


def parse_file(data: bytes, source: str, expect: str = FORMAT) -> tuple[dict, dict]:
    """bytes -> (tensors, sharedllm metadata); refuses anything that is not a well-formed sharedllm file.

    For adapters this is the one strict parser (upload, eval, inspect, compress, export all come here): header
    structure, metadata fields (known ones only), types and strings (no lone surrogate), tensor names, dtypes
    equal to the scheme's, shapes, the order of their data, finite values within +-value_bound (MAX_GAIN; a full
    fine-tune: float16's range). Every refusal is one SharedLLMError line naming the file and the problem."""
    header = read_header(data, source)
    meta = header_meta(header, source)
    if meta is None or not isinstance(meta.get("format"), str) or meta["format"] != expect:
        raise SharedLLMError(f"{source}: a safetensors file, but not a {expect} (no sharedllm metadata)")
    if expect == FORMAT:
        check_adapter_meta(meta, source)
        _check_tensors(header, meta, source)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise SharedLLMError(f"{source}: unreadable safetensors data ({str(e)[:120]})") from None
    if expect == FORMAT:
        return ParsedTensors(tensors, check_values(tensors, meta, source)), meta
    return tensors, meta


def read_file(path, expect: str = FORMAT) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise SharedLLMError(f"{path}: no such file")
    return parse_file(path.read_bytes(), str(path), expect)


def _check_layout(meta: dict, layout, source: str) -> None:
    """The file's layout hash, params and per-tensor shapes are those of the method's tensors on this base."""
    if meta.get("layout") != layout_hash(layout) or meta.get("params") != sum(math.prod(s) for _, s in layout):
        raise SharedLLMError(f"{source}: tensor names or shapes do not match method {meta.get('method')!r} on this "
                             f"base (layout {meta.get('layout')} vs expected {layout_hash(layout)})")
    want, got = [list(s) for _, s in layout], meta.get("shapes")
    if got != want:  # same hash and total, other boundaries: each tensor would be read from the wrong values
        got = got if isinstance(got, list) else []
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        say = lambda shapes: str(shapes[i])[:40] if i < len(shapes) else "none"  # noqa: E731
        raise SharedLLMError(f"{source}: metadata shapes do not match method {meta.get('method')!r} on this base: "
                             f"tensor {i} is {say(got)}, the base's is {say(want)} ({len(got)} tensors listed, "
                             f"{len(want)} expected)")


def decode_adapter(tensors: dict, meta: dict, layout, base_state: dict, source: str) -> dict[str, torch.Tensor]:
    """Check an adapter's layout and values against this base; return its named fp32 tensors."""
    _check_layout(meta, layout, source)
    scheme = meta.get("scheme", "float16")
    if scheme in FLOAT_SCHEMES:
        if set(tensors) != {"adapter"}:
            raise SharedLLMError(f"{source}: expected one tensor named 'adapter', found {sorted(tensors)}")
        flat = tensors["adapter"].float()
    else:
        kept = tensors.kept_values() if isinstance(tensors, ParsedTensors) else None
        if kept is not None:  # int8_reference: zero for every scheme but int8-delta
            flat = kept + int8_reference(layout, base_state, scheme)
        elif scheme in INT4_GROUPS:
            flat = decode_int4(tensors, meta, layout, source)
        else:
            flat = decode_int8(tensors, meta, layout, base_state, source)
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
