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


def read_header(data: bytes, source: str) -> dict:
    """Parse and sanity-check a safetensors header without touching tensor data."""
    if len(data) < 8:
        raise SharedLLMError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SharedLLMError(f"{source}: not a safetensors file, or truncated (header length {n}, file {len(data)})")
    try:
        header = json.loads(data[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SharedLLMError(f"{source}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise SharedLLMError(f"{source}: not a safetensors file (header is not a JSON object)")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != len(data):
        raise SharedLLMError(f"{source}: truncated or padded safetensors file (data does not match the header)")
    return header


def parse_file(data: bytes, source: str, expect: str = FORMAT) -> tuple[dict, dict]:
    """bytes -> (tensors, sharedllm metadata); refuses anything that is not a sharedllm safetensors file."""
    header = read_header(data, source)
    try:
        meta = json.loads(header.get("__metadata__", {}).get(META_KEY, "null"))
    except (json.JSONDecodeError, AttributeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != expect:
        raise SharedLLMError(f"{source}: a safetensors file, but not a {expect} (no sharedllm metadata)")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise SharedLLMError(f"{source}: unreadable safetensors data ({e})") from None
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
    return unflatten(flat, layout)


def check_binding(meta: dict, base_fingerprint: str, source: str) -> None:
    need = meta.get("base_fingerprint")
    if need != base_fingerprint:
        raise SharedLLMError(f"{source}: adapter was trained on base {str(need)[:16]}..., but the loaded base is "
                             f"{base_fingerprint[:16]}...; an adapter only works on the exact base it was trained on")


def file_fingerprint(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
