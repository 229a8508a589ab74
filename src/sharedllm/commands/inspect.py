"""sharedllm inspect: what a sharedllm file is, read from its safetensors header (nothing is unpickled)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import wire
from ..errors import SharedLLMError

HELP = "describe an adapter or base file: kind, method, params, bytes, dtype, fingerprints"


def configure(p) -> None:
    p.add_argument("file", help="a .safetensors file written by sharedllm")


def run(args) -> dict:
    path = Path(args.file)
    if not path.is_file():
        raise SharedLLMError(f"{path}: no such file")
    data = path.read_bytes()
    header = wire.read_header(data, str(path))
    meta = json.loads(header.get("__metadata__", {}).get(wire.META_KEY, "{}"))
    kind = {"sharedllm-adapter": "adapter", "sharedllm-ternary-base": "base"}.get(meta.get("format"))
    if kind is None:
        raise SharedLLMError(f"{path}: a safetensors file, but not one written by sharedllm")
    dtypes = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
    out = {"file": str(path), "kind": kind, "bytes": len(data), "dtype": ",".join(dtypes),
           "fingerprint": wire.file_fingerprint(path), **meta}
    out.pop("format", None)
    return out


def render(r: dict) -> str:
    keys = ["kind", "method", "scheme", "params", "bytes", "dtype", "bits_per_weight", "fingerprint",
            "base_fingerprint", "source_fingerprint"]
    return "\n".join(f"{k:18s} {r[k]}" for k in keys if k in r)
