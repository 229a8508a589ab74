"""Bytes per user of every adapter method, as files the product writes: for each registered method at its default
config, a fresh adapter on the base saved as sharedllm writes it (fp16 safetensors, bound to the base) and as its
int8 file (`compress --scheme int8`), with its trainable numbers. The file size does not depend on the values.

    PYTHONPATH=src python bench/method_bytes.py [--base default] [--json bench/results/method_bytes_<base>.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sharedllm.adapters import METHODS
from sharedllm.base import load_base
from sharedllm.personalise import new_adapter, save_adapted
from sharedllm.quant.compress import encode_adapter

SKIP = ("full",)  # a full fine-tune is the base's size: not a per-user format here


def measure(base, method: str, folder: Path) -> dict:
    adapted = new_adapter(base, method, seed=0)
    path = save_adapted(adapted, folder / f"{method}.safetensors", base)
    return {"numbers": sum(p.numel() for p in adapted.params.values()), "fp16_bytes": path.stat().st_size,
            "int8_bytes": len(encode_adapter(base, adapted, "int8")),
            "per_row": METHODS[method].caps.rows is not None, "config": str(adapted.config)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    base = load_base(args.base)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for method in (m for m in METHODS if m not in SKIP):
            out[method] = measure(base, method, Path(d))
            r = out[method]
            print(f"{method:8s} {r['numbers']:>10,} numbers  fp16 file {r['fp16_bytes']:>11,} B  int8 file "
                  f"{r['int8_bytes']:>11,} B  {'per row' if r['per_row'] else 'not per row'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base.name, "methods": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
