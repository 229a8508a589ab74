"""Fuzz the one adapter parser: seeded mutations of valid adapter files (fp16 and int8) through
`wire.parse_file` + `load_adapted` (what upload, eval, compress and export run), `sharedllm inspect` and
`sharedllm eval`, in process on the tiny base.

    python bench/fuzz_adapters.py --n 1000 [--seed 0]

Prints a table: inputs, 5xx (here: an exception other than SharedLLMError), tracebacks, accepted-invalid (a
mutant that changes what the file means but loads anyway, or that inspect and eval judge differently), and
exits 1 on any. "Valid mutants" load and pass an oracle independent of the parser (same dtypes as the original,
finite values within +-64, and the original's exact values unless only payload bytes were edited): e.g. a new
free-form metadata field, or a flipped payload byte that gives another finite gain.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import struct
import sys
import tempfile
from pathlib import Path

import torch

from sharedllm import wire
from sharedllm.base import load_base
from sharedllm.cli import main as cli
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, save_adapted
from sharedllm.quant.compress import encoded

DTYPES = list(wire.DTYPE_SIZES) + ["F17", "", 5, None, "f16"]
ODD = [None, 5, -1, 2 ** 70, 1.5, "x", "", [], {}, [0], [0, "x"], [0, 0, 0], True, float("nan"), "\ud800"]


def split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def join(header, payload: bytes) -> bytes:
    h = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(h)) + h + payload


def _meta_edit(rng, h):
    meta = json.loads(h["__metadata__"]["sharedllm"])
    key = rng.choice(sorted(meta) + ["format", "extra"])
    meta[key] = rng.choice(ODD + [meta.get(key)])
    h["__metadata__"]["sharedllm"] = json.dumps(meta)


def _entry_edit(rng, h):
    name = rng.choice([k for k in h if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets"])
    h[name][field] = rng.choice(DTYPES if field == "dtype" else ODD + [[2, 160], [640], [320, 1]])


def _relabel(rng, h):
    name = rng.choice([k for k in h if k != "__metadata__"])
    h[name]["dtype"] = rng.choice(list(wire.DTYPE_SIZES))
    size = wire.DTYPE_SIZES[h[name]["dtype"]]
    nbytes = h[name]["data_offsets"][1] - h[name]["data_offsets"][0]
    if nbytes % size == 0:  # keep the byte count right: only the meaning of the bytes changes
        h[name]["shape"] = [nbytes // size]


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, bool]:
    """-> (mutant, whether only bytes of the payload may have changed, so that its values may differ)."""
    kind = rng.randrange(9)
    if kind == 0:  # random byte flips anywhere
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), True
    if kind == 1:
        return data[: rng.randrange(len(data))], False
    if kind == 2:
        return data + bytes(rng.randint(1, 64)), False
    h, payload = split(data)
    if kind == 3:
        _meta_edit(rng, h)
    elif kind == 4:
        _entry_edit(rng, h)
    elif kind == 5:
        _relabel(rng, h)
    elif kind == 6:  # special values into the payload
        vals = torch.frombuffer(bytearray(payload), dtype=torch.uint8).clone()
        special = rng.choice([b"\x00\x7c", b"\x00\xfc", b"\x00\x7e", b"\xff\x7b", b"\x00\x54"])  # inf -inf nan 65504 64
        i = rng.randrange(0, len(vals) - 1, 2)
        vals[i: i + 2] = torch.tensor(list(special), dtype=torch.uint8)
        return join(h, vals.numpy().tobytes()), True
    elif kind == 7:
        h["__metadata__"][rng.choice(["sharedllm", "other"])] = rng.choice(
            ["5", "[]", "{", '{"format": NaN}', "null", '"x"', json.dumps({"format": "sharedllm-adapter"})])
    else:
        h[rng.choice(["extra", "__metadata__"])] = rng.choice(ODD)
    return join(h, payload), False


def flat_of(adapted) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in adapted.params.values()])


def dtypes(data: bytes) -> dict:
    h, _ = split(data)
    return {k: v["dtype"] for k, v in h.items() if k != "__metadata__"}


def wrongly_accepted(base, data: bytes, original: bytes, payload_edit: bool) -> bool:
    """An oracle independent of the parser: a mutant that loads must hold the original's tensor dtypes, finite
    values within +-MAX_GAIN, and (unless only its payload was edited) exactly the original's values."""
    got = flat_of(load_adapted(base, data=data, source="mutant"))
    if dtypes(data) != dtypes(original) or not torch.isfinite(got).all() or got.abs().max() > wire.MAX_GAIN:
        return True
    return not payload_edit and not torch.equal(got, flat_of(load_adapted(base, data=original, source="seed")))


def judge(base, path: Path, text: Path) -> dict:
    """Run the three consumers; -> what each said."""
    out = {}
    try:
        load_adapted(base, data=path.read_bytes(), source=str(path))
        out["load"] = "ok"
    except SharedLLMError:
        out["load"] = "refused"
    except Exception as e:  # noqa: BLE001  a crash is exactly what we count
        out["load"] = f"crash {type(e).__name__}: {e}"
    for name, argv in (("inspect", ["inspect", str(path), "--base", "tiny"]),
                       ("eval", ["eval", "--text", str(text), "--adapter", str(path), "--base", "tiny",
                                 "--window", "32", "--eval-tokens", "64"])):
        err, so = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
                code = cli(argv)
        except Exception as e:  # noqa: BLE001
            code, err = 99, io.StringIO(f"Traceback {type(e).__name__}: {e}")
        out[name] = code
        out[f"{name}_tb"] = "Traceback" in err.getvalue()
    return out


def seeds(base, tmp: Path) -> list[bytes]:
    files = []
    for i, scheme in enumerate(["raw", "int8", "int8-channel", "int8-delta"]):
        a = new_adapter(base, "norm")
        with torch.no_grad():
            for p in a.params.values():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        path = save_adapted(a, tmp / f"seed{i}.safetensors", base)
        if scheme != "raw":
            tensors, meta = wire.parse_file(path.read_bytes(), "seed")
            layout = wire.layout_of(a.params)
            path.write_bytes(encoded(tensors["adapter"].float(), layout, dict(base.model.named_parameters()), meta,
                                     scheme))
        files.append(path.read_bytes())
    return files


def run(n: int, seed: int) -> dict:
    base = load_base("tiny")
    rng = random.Random(seed)
    counts = {"inputs": 0, "refused": 0, "valid mutants": 0, "5xx": 0, "tracebacks": 0, "accepted-invalid": 0}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        text = tmp / "user.txt"
        text.write_text("the cat sat on the mat and ran away from the dog. " * 40)
        good = seeds(base, tmp)
        for i in range(n):
            original = rng.choice(good)
            data, payload_edit = mutate(rng, original)
            path = tmp / "mutant.safetensors"
            path.write_bytes(data)
            r = judge(base, path, text)
            counts["inputs"] += 1
            crash = r["load"].startswith("crash") or 99 in (r["inspect"], r["eval"])
            counts["5xx"] += crash
            counts["tracebacks"] += r["inspect_tb"] or r["eval_tb"]
            loads = r["load"] == "ok"
            disagree = loads != (r["eval"] == 0) or loads != (r["inspect"] == 0)
            bad = disagree or (loads and wrongly_accepted(base, data, original, payload_edit))
            counts["accepted-invalid"] += bad
            counts["valid mutants" if loads else "refused"] += 1
            if crash or bad:
                print(f"input {i}: {r}", file=sys.stderr)
    return counts


def fuzz_main(run, doc: str, fail: tuple) -> int:
    """The fuzzers' command line: --n inputs from --seed, a one-row table of counts, exit 1 if any `fail` count."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = run(args.n, args.seed)
    print("| " + " | ".join(counts) + " |\n|" + "---|" * len(counts) + "\n| " +
          " | ".join(str(v) for v in counts.values()) + " |")
    return 1 if any(counts[k] for k in fail) else 0


def main() -> int:
    return fuzz_main(run, __doc__, ("5xx", "tracebacks", "accepted-invalid"))


if __name__ == "__main__":
    sys.exit(main())
