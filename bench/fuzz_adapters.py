"""Fuzz the one adapter parser: seeded mutations of valid adapter files (fp16 and int8) through
`wire.parse_file` + `load_adapted` (what upload, eval, compress and export run), `sharedllm inspect` and
`sharedllm eval`, in process on the tiny base.

    python bench/fuzz_adapters.py --n 1000 [--seed 0]

Prints a table: inputs, 5xx (here: an exception other than SharedLLMError), tracebacks, accepted-invalid (a
mutant that changes what the file means but loads anyway, or that inspect and eval judge differently), and
exits 1 on any. "Valid mutants" load and pass an oracle independent of the parser (same dtypes as the original,
finite values within +-64, the original's exact values unless only payload bytes were edited, the original's
metadata shapes and params, no lone surrogate anywhere in the header, no top-level metadata field outside
wire.KNOWN_META_FIELDS, a version that is absent or looks like one): e.g. a free-form value under a known field,
another plausible version, or a flipped payload byte that gives another finite gain.

Mutation kinds (issue 34 added the last five): byte flips, truncation, padding, metadata field edits, header entry
edits, dtype relabelling, special payload values, odd __metadata__, odd header keys; data_offsets / shape
mismatches (a tensor longer or shorter than its shape or than the metadata, offsets swapped or moved between
tensors), metadata shapes that move tensor boundaries, lone surrogates anywhere in the metadata or the header
(keys or values, nested), unknown top-level fields, versions (valid, invalid, absent).

Seeds also include joint core files (`compress --joint`, issue 32 item 2) with their shared files beside the mutants:
a mutant core file must be refused, or load as its materialised LoRA and pass the same oracle.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import re
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
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d"]  # lone: high, low, half of an emoji pair
VALID_VERSIONS = ["0.1.0", "0.0.1", "0.2.0", "1.0", "1.2.3rc1", "0.2.0.dev3", "0.1.0+local.7", "10.20.30.40"]
BAD_VERSIONS = [5, 0.1, None, True, [], {}, "", "x", "1", "v0.1.0", "0.1.0 ", " 0.1.0", "0.1.0\n", "0..1", "0.1.",
                "\u0661.\u0662.\u0663", "0.1.0;rm -rf", "9" * 50, "0." * 30 + "1", "0.1.0-" + "a" * 40]
UNKNOWN_FIELDS = ["extra", "Version", "format ", "user_id", "__proto__", "scales", "adapter", "notes", "shape",
                  "\u00e9t\u00e9", "x" * 80]


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


def _spans(h) -> list[str]:
    """The header's tensor names in the order of their data."""
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])


def _offsets_edit(rng, h, payload: bytes) -> bytes:
    """A tensor longer or shorter than its shape or than the metadata says, through its data_offsets."""
    names = _spans(h)
    name = rng.choice(names)
    e, size = h[name], wire.DTYPE_SIZES[h[name]["dtype"]]
    d = rng.choice([-2, -1, 1, 2]) * rng.choice([1, size, 4 * size])
    how = rng.randrange(4) if len(names) > 1 else rng.randrange(2)
    if how in (0, 1):  # the end moves (and everything after it): 0 keeps the shape, 1 follows with it
        end = e["data_offsets"][1]
        for k in names:
            h[k]["data_offsets"] = [o + d if o >= end and not (k == name and o == e["data_offsets"][0]) else o
                                    for o in h[k]["data_offsets"]]
        if how == 1 and d % size == 0:
            e["shape"] = [max(0, e["shape"][0] + d // size)]
        return payload + bytes(d) if d > 0 else payload[:d]
    a, b = names[0], names[1]
    if how == 2:  # the offsets of two tensors exchanged
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    else:  # the boundary between two neighbours moved, the total kept
        h[a]["data_offsets"][1] += d
        h[b]["data_offsets"][0] += d
    return payload


def _shapes_edit(rng, meta: dict) -> None:
    """Metadata shapes that move tensor boundaries (the total kept or not), or tensors dropped or added."""
    shapes = meta["shapes"]
    i, j = rng.sample(range(len(shapes)), 2)
    how = rng.randrange(4)
    if how == 0:
        k = rng.choice([1, 16, 63])
        shapes[i], shapes[j] = [shapes[i][0] + k], [max(0, shapes[j][0] - k)]
    elif how == 1:
        shapes[i] = rng.choice([[8, 8], [64, 1], [1, 64], [2, 4, 8], [], [0]])
    elif how == 2:
        shapes.pop(i)
        meta["params"] = sum(math.prod(s) for s in shapes) if rng.random() < 0.7 else meta["params"]
    else:
        shapes.insert(i, [rng.choice([1, 64])])
        meta["params"] = sum(math.prod(s) for s in shapes) if rng.random() < 0.7 else meta["params"]


def _string_slots(obj, out: list) -> list:
    """(container, key) for every string value and ("key", container, key) for every key, at any depth."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        if isinstance(obj, dict):
            out.append(("key", obj, k))
        if isinstance(v, str):
            out.append(("value", obj, k))
        _string_slots(v, out)
    return out


def _with_surrogate(rng, text: str) -> str:
    at = rng.randrange(len(text) + 1)
    return text[:at] + rng.choice(SURROGATES) + text[at:]


def _surrogate_edit(rng, h, meta: dict) -> None:
    """A lone surrogate into a key or a string anywhere: the metadata (nested too) or the header itself."""
    if rng.random() < 0.3:  # plant a nested structure under a free-form field first
        meta[rng.choice(["train", "loss", "policy"])] = {"lr": 1e-3, "notes": ["a", {"by": "seed"}]}
    in_meta = rng.random() < 0.8
    if not in_meta:
        h["__metadata__"]["sharedllm"] = json.dumps(meta)
    kind, box, key = rng.choice(_string_slots(meta if in_meta else h, []))
    if kind == "key":
        box[_with_surrogate(rng, key)] = box.pop(key)
    else:
        box[key] = _with_surrogate(rng, box[key])
    if in_meta:
        h["__metadata__"]["sharedllm"] = json.dumps(meta)


def _version_edit(rng, meta: dict) -> None:
    if rng.random() < 0.1:
        meta.pop("version", None)
    else:
        meta["version"] = rng.choice(VALID_VERSIONS if rng.random() < 0.3 else BAD_VERSIONS)


def _new_kinds(rng, kind: int, h, payload: bytes) -> bytes:
    """Issue 34's kinds (9-13) on a split file; -> the payload."""
    if kind == 9:
        return _offsets_edit(rng, h, payload)
    meta = json.loads(h["__metadata__"]["sharedllm"])
    if kind == 11:
        _surrogate_edit(rng, h, meta)
        return payload
    if kind == 10:
        _shapes_edit(rng, meta)
    elif kind == 12:
        meta[rng.choice(UNKNOWN_FIELDS)] = rng.choice(ODD + ["seed"])
    else:
        _version_edit(rng, meta)
    h["__metadata__"]["sharedllm"] = json.dumps(meta)
    return payload


KINDS = ["byte flips", "truncated", "padded", "metadata field", "header entry", "dtype relabelled",
         "special values", "odd __metadata__", "odd header key", "offsets/shape", "metadata shapes", "surrogate",
         "unknown field", "version"]


def mutate(rng: random.Random, data: bytes, kind: int | None = None) -> tuple[bytes, bool]:
    """-> (mutant, whether only bytes of the payload may have changed, so that its values may differ).
    `kind`: an index into KINDS (random when None)."""
    kind = rng.randrange(len(KINDS)) if kind is None else kind
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
    elif kind == 8:
        h[rng.choice(["extra", "__metadata__"])] = rng.choice(ODD)
    else:
        payload = _new_kinds(rng, kind, h, payload)
    return join(h, payload), False


def flat_of(adapted) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in adapted.params.values()])


def dtypes(data: bytes) -> dict:
    h, _ = split(data)
    return {k: v["dtype"] for k, v in h.items() if k != "__metadata__"}


def valid_unicode(obj) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate somewhere
        return False


def looks_like_a_version(v) -> bool:
    """A necessary condition, simpler than the parser's rule: short ASCII, a leading digit, a dot."""
    return isinstance(v, str) and len(v) <= 40 and re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", v) is not None and "." in v


def meta_wrong(data: bytes, original: bytes) -> bool:
    """The header of a mutant that loads: valid Unicode throughout, only known top-level fields, a version that
    is absent or looks like one, and the original's shapes and params."""
    h, m = split(data)[0], json.loads(split(data)[0]["__metadata__"]["sharedllm"])
    o = json.loads(split(original)[0]["__metadata__"]["sharedllm"])
    return (not valid_unicode(h) or not valid_unicode(m) or not set(m) <= wire.KNOWN_META_FIELDS
            or ("version" in m and not looks_like_a_version(m["version"]))
            or (m["shapes"], m["params"]) != (o["shapes"], o["params"]))


def wrongly_accepted(base, data: bytes, original: bytes, payload_edit: bool, shared_dirs=()) -> bool:
    """An oracle independent of the parser: a mutant that loads must hold the original's tensor dtypes, finite
    values within +-MAX_GAIN, (unless only its payload was edited) exactly the original's values, and metadata
    that passes `meta_wrong`."""
    got = flat_of(load_adapted(base, data=data, source="mutant", shared_dirs=shared_dirs))
    if dtypes(data) != dtypes(original) or not torch.isfinite(got).all() or got.abs().max() > wire.MAX_GAIN:
        return True
    if meta_wrong(data, original):
        return True
    seed = load_adapted(base, data=original, source="seed", shared_dirs=shared_dirs)
    return not payload_edit and not torch.equal(got, flat_of(seed))


def printable(text: str) -> bool:
    """Whether a message can be written as UTF-8 (a terminal, a log, a JSON 4xx): no lone surrogate in it."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def judge(base, path: Path, text: Path) -> dict:
    """Run the three consumers; -> what each said (a refusal or an output that cannot be printed is a crash:
    the server would answer it with a 500)."""
    out = {}
    try:
        load_adapted(base, data=path.read_bytes(), source=str(path), shared_dirs=[path.parent])
        out["load"] = "ok"
    except SharedLLMError as e:
        out["load"] = "refused" if printable(str(e)) else f"crash unprintable refusal {ascii(str(e))[:100]}"
    except Exception as e:  # noqa: BLE001  a crash is exactly what we count
        out["load"] = f"crash {type(e).__name__}: {ascii(str(e))[:200]}"
    for name, argv in (("inspect", ["inspect", str(path), "--base", "tiny"]),
                       ("eval", ["eval", "--text", str(text), "--adapter", str(path), "--base", "tiny",
                                 "--window", "32", "--eval-tokens", "64"])):
        err, so = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
                code = cli(argv)
        except Exception as e:  # noqa: BLE001
            code, err = 99, io.StringIO(f"Traceback {type(e).__name__}: {e}")
        out[name] = code if printable(err.getvalue() + so.getvalue()) else 99
        out[f"{name}_tb"] = "Traceback" in err.getvalue()
    return out


SEEDS = [("norm", "raw"), ("norm", "int8"), ("norm", "int8-channel"), ("norm", "int8-delta"), ("lora", "raw"),
         ("lora", "int8-channel"), ("lora", "int4-g32"), ("ia3", "raw"), ("ia3", "int8-channel")]


def seeds(base, tmp: Path) -> list[bytes]:
    """Valid files of every scheme (norm; LoRA raw, int8-channel and int4-g32; (IA)^3 raw and int8-channel),
    with the metadata training writes."""
    files = []
    for i, (method, scheme) in enumerate(SEEDS):
        a = new_adapter(base, method)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in a.params.values():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))
        info = {"user_text": f"user{i}.txt", "train": {"steps": 100, "lr": 1e-3, "seed": i},
                "loss": {"first": 5.5, "last": 4.25}}
        path = save_adapted(a, tmp / f"seed{i}.safetensors", base, info=info)
        if scheme != "raw":
            tensors, meta = wire.parse_file(path.read_bytes(), "seed")
            layout = wire.layout_of(a.params)
            path.write_bytes(encoded(tensors["adapter"].float(), layout, dict(base.model.named_parameters()), meta,
                                     scheme))
        files.append(path.read_bytes())
    return files


def joint_seeds(base, tmp: Path) -> list[bytes]:
    """Joint core files (`compress --joint` of three LoRAs at joint rank 4 and 8); their shared files stay in `tmp`,
    beside the mutants, where loading (and inspect, and eval) looks for them."""
    from sharedllm.quant import lora_joint

    src = tmp / "cohort"
    src.mkdir()
    for i in range(3):
        a = new_adapter(base, "lora")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in a.params.values():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        save_adapted(a, src / f"u{i}.safetensors", base, info={"user_text": f"u{i}.txt"})
    files = []
    for k in (4, 8):
        lora_joint.compress_dir(base, src, tmp / f"joint{k}", k)
        for f in (tmp / f"joint{k}").glob("shared-*.safetensors"):
            (tmp / f.name).write_bytes(f.read_bytes())
        files.append((tmp / f"joint{k}" / "u0.safetensors").read_bytes())
    return files


def run(n: int, seed: int) -> dict:
    base = load_base("tiny")
    rng = random.Random(seed)
    counts = {"inputs": 0, "refused": 0, "valid mutants": 0, "5xx": 0, "tracebacks": 0, "accepted-invalid": 0}
    by_kind = {k: [0, 0, 0] for k in KINDS}  # inputs, valid mutants, crashes or accepted-invalid
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        text = tmp / "user.txt"
        text.write_text("the cat sat on the mat and ran away from the dog. " * 40)
        good = seeds(base, tmp) + joint_seeds(base, tmp)
        for i in range(n):
            original, kind = rng.choice(good), rng.randrange(len(KINDS))
            data, payload_edit = mutate(rng, original, kind)
            path = tmp / "mutant.safetensors"
            path.write_bytes(data)
            r = judge(base, path, text)
            counts["inputs"] += 1
            crash = r["load"].startswith("crash") or 99 in (r["inspect"], r["eval"])
            counts["5xx"] += crash
            counts["tracebacks"] += r["inspect_tb"] or r["eval_tb"]
            loads = r["load"] == "ok"
            disagree = loads != (r["eval"] == 0) or loads != (r["inspect"] == 0)
            bad = disagree or (loads and wrongly_accepted(base, data, original, payload_edit, [tmp]))
            counts["accepted-invalid"] += bad
            counts["valid mutants" if loads else "refused"] += 1
            row = by_kind[KINDS[kind]]
            row[0], row[1], row[2] = row[0] + 1, row[1] + loads, row[2] + (crash or bad)
            if crash or bad:
                print(f"input {i} ({KINDS[kind]}): {r}", file=sys.stderr)
    print("by kind: " + "; ".join(f"{k} {a} ({v} valid, {b} bad)" for k, (a, v, b) in by_kind.items()))
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
