"""sharedllm inspect: what a sharedllm file is, read from its safetensors header (nothing is unpickled).

Adapters go through the same strict parser as `eval` and the server (`wire.parse_file`): a file they refuse is
shown as far as it can be read, marked INVALID with the reason, and the command exits 1. What needs the base
(binding, layout hash, int8-delta values) is checked only with `--base`, exactly as `eval` checks it."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .. import wire
from ..errors import SharedLLMError

HELP = "describe an adapter or base file: kind, method, params, bytes, dtype, fingerprints (INVALID if refused)"
KINDS = {"sharedllm-adapter": "adapter", "sharedllm-ternary-base": "base", "sharedllm-lora-bases": "shared bases"}


def configure(p) -> None:
    p.add_argument("file", help="a .safetensors file written by sharedllm")
    p.add_argument("--base", default=None,
                   help="also check an adapter against this base exactly as eval does (binding, layout, values)")
    p.add_argument("--device", default="cpu", help="torch device for --base")


def run(args) -> dict:
    path = Path(args.file)
    if not path.is_file():
        raise SharedLLMError(f"{path}: no such file")
    data = path.read_bytes()
    out = {"file": str(path), "bytes": len(data), "fingerprint": wire.file_fingerprint(path)}
    try:
        header = wire.read_header(data, str(path))
        meta = wire.header_meta(header, str(path)) or {}
        out["dtype"] = ",".join(sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"}))
        fmt = meta.get("format")
        out.update(kind=KINDS.get(fmt) if isinstance(fmt, str) else None,
                   **{k: v for k, v in meta.items() if k != "format"})
        if out["kind"] is None:
            raise SharedLLMError(f"{path}: a safetensors file, but not one written by sharedllm")
        if out["kind"] == "adapter":
            wire.parse_file(data, str(path))
            if args.base:
                _against_base(args, data, str(path))
        if out["kind"] == "shared bases":  # compress --joint's shared file: strict parse (binding with --base)
            from ..quant import lora_joint

            lora_joint.parse_shared(data, str(path), _base(args).fingerprint if args.base else None)
    except SharedLLMError as e:
        return {**_salvage(data), **out, "ok": False, "invalid": str(e)}
    return {**out, "ok": True}


def _base(args):
    from ..base import load_base

    return load_base(args.base, args.device)


def _against_base(args, data: bytes, source: str) -> None:
    from ..personalise import load_adapted

    load_adapted(_base(args), data=data, source=source, shared_dirs=[Path(source).parent])


def _salvage(data: bytes) -> dict:
    """What can be read of a broken file's header without trusting it (shown only next to INVALID)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8: 8 + min(n, wire.MAX_HEADER)])
        meta = json.loads(header["__metadata__"][wire.META_KEY])
        return {k: meta[k] for k in ("method", "scheme", "params")  # no lone surrogate: it could not be printed
                if isinstance(meta, dict) and k in meta and wire.surrogate_at(meta[k]) is None}
    except Exception:  # anything unreadable: show nothing more
        return {}


def render(r: dict) -> str:
    keys = ["kind", "method", "method_config", "scheme", "joint", "on_top", "rank", "users", "params", "bytes", "dtype", "compute_dtype", "bits_per_weight",
            "fingerprint", "base_fingerprint", "source_fingerprint"]
    lines = [f"{k:18s} {r[k]}" for k in keys if k in r and r[k] is not None]
    if not r["ok"]:
        lines.insert(0, f"{'INVALID':18s} {r['invalid']}")
    return "\n".join(lines)
