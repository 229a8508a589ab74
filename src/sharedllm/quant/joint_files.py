"""The file side of joint LoRA compression (`sharedllm compress --joint`, quant/lora_joint.py): the shared-bases
file's strict parser, its lookup by sha256 (a core file's folder, a server store's `shared/`) with a small cache, and
materialising a core file as an ordinary LoRA (rank min(Kj, r): B' = U P_r S_r^(1/2) / s', A' = S_r^(1/2) Q_r^T V^T
for C_u = P S Q^T), which the per-row LoRA kernel serves unchanged. Apart from the compression so that loading an
adapter (personalise.load_adapted) needs nothing that imports personalise back.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from .. import wire
from ..adapters import config_from_json, config_to_json
from ..adapters.lora import A_KEY, B_KEY, LoraConfig
from ..errors import SharedLLMError

SHARED_FORMAT = "sharedllm-lora-bases"
SHARED_FIELDS = ("format", "format_version", "base_fingerprint", "rank", "sites", "method_config", "users",
                 "iters", "version")
MAX_SITES = 4096
ORTHO_TOL = 1e-4  # |U^T U - I| and |V^T V - I| of a shared file, entry by entry
CORE = ".core"


@dataclass(frozen=True)
class Shared:
    """A checked shared file: its sha256, joint rank, sites (name -> (U [N, Kj], V [K, Kj]) fp32), source config."""

    sha256: str
    rank: int
    sites: dict
    config: LoraConfig


def shared_name(sha: str) -> str:
    return f"shared-{sha[:16]}.safetensors"


# ---- the shared file: strict parser, lookup by sha256, cache ----------------------------------------------------
def _bad(source: str, what: str):
    return SharedLLMError(f"{source}: not a valid shared-bases file ({what})")


def _check_shared_meta(meta, source: str) -> tuple[int, list]:
    if not isinstance(meta, dict) or meta.get("format") != SHARED_FORMAT:
        raise _bad(source, f"no {SHARED_FORMAT} metadata")
    extra = sorted(set(meta) - set(SHARED_FIELDS))
    missing = sorted(set(SHARED_FIELDS) - {"version"} - set(meta))
    if extra or missing:
        raise _bad(source, f"metadata fields: unknown {[str(x)[:40] for x in extra[:3]]}, missing {missing}")
    k, sites = meta["rank"], meta["sites"]
    ints = lambda v, lo, hi: wire._is_int(v) and lo <= v <= hi  # noqa: E731
    if meta["format_version"] != 1 or not wire._is_int(meta["format_version"]):
        raise _bad(source, "format_version must be 1")
    if not isinstance(meta["base_fingerprint"], str) or not ints(k, 1, wire.MAX_JOINT_RANK):
        raise _bad(source, f"base_fingerprint a string, rank an integer in 1..{wire.MAX_JOINT_RANK}")
    if not ints(meta["users"], 1, 1 << 40) or not ints(meta["iters"], 0, 1000):
        raise _bad(source, "users a positive integer, iters an integer in 0..1000")
    if "version" in meta and not wire.plausible_version(meta["version"]):
        raise _bad(source, "version must look like 0.1.0")
    ok = isinstance(sites, list) and 1 <= len(sites) <= MAX_SITES and all(
        isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and 0 < len(s[0]) <= 200
        and ints(s[1], k, 1 << 20) and ints(s[2], k, 1 << 20) for s in sites)
    if not ok or len({s[0] for s in sites}) != len(sites):
        raise _bad(source, f"sites must be 1..{MAX_SITES} distinct [name, N, K] with N, K >= rank {k}")
    return k, sites


def parse_shared(data: bytes, source: str, base_fingerprint: str | None) -> Shared:
    """Bytes of a shared-bases file -> Shared, refusing anything malformed: header, exact metadata fields and types,
    the one F32 tensor `bases` of the sites' size, finite orthonormal columns, the base binding (unless
    `base_fingerprint` is None: `inspect` without --base)."""
    header = wire.read_header(data, source)
    meta = wire.header_meta(header, source)
    k, sites = _check_shared_meta(meta, source)
    config = config_from_json("lora", meta["method_config"], source)
    n = sum(k * (a + b) for _, a, b in sites)
    got = {name: (e["dtype"], e["shape"]) for name, e in header.items() if name != "__metadata__"}
    if got != {"bases": ("F32", [n])}:
        raise _bad(source, f"expects one tensor 'bases' F32 [{n}], found {str(got)[:80]}")
    if base_fingerprint is not None and meta["base_fingerprint"] != base_fingerprint:
        raise SharedLLMError(f"{source}: shared bases of base {meta['base_fingerprint'][:16]}..., but the loaded base "
                             f"is {base_fingerprint[:16]}...")
    flat = st_load(data)["bases"]
    if not torch.isfinite(flat).all():
        raise _bad(source, "non-finite values")
    out, at = {}, 0
    eye = torch.eye(k, dtype=torch.float64)
    for name, a, b in sites:
        u = flat[at: at + a * k].reshape(a, k)
        v = flat[at + a * k: at + (a + b) * k].reshape(b, k)
        at += (a + b) * k
        for m in (u, v):
            if (m.double().t() @ m.double() - eye).abs().max() > ORTHO_TOL:
                raise _bad(source, f"site {name[:60]!r}: bases are not orthonormal")
        out[name] = (u, v)
    return Shared(hashlib.sha256(data).hexdigest(), k, out, config)


_CACHE: OrderedDict = OrderedDict()  # sha256 -> Shared (content-addressed: verified once, immutable)
_CACHE_LOCK = threading.Lock()
CACHE_ENTRIES = 4


def load_shared(sha: str, dirs, source: str, base_fingerprint: str) -> Shared:
    """The shared file of sha256 `sha`: cached, or found as shared-<sha[:16]>.safetensors or <sha>.safetensors in
    `dirs`, its sha256 verified, parsed strictly. A missing or mismatching file is a SharedLLMError naming both."""
    with _CACHE_LOCK:
        if sha in _CACHE:
            _CACHE.move_to_end(sha)
            return _CACHE[sha]
    paths = [Path(d) / name for d in dirs for name in (shared_name(sha), f"{sha}.safetensors")]
    found = next((p for p in paths if p.is_file()), None)
    if found is None:
        where = f"in {', '.join(sorted({str(Path(d)) for d in dirs}))}" if dirs else "given (no folder to look in)"
        raise SharedLLMError(f"{source}: its shared bases {shared_name(sha)} (sha256 {sha}) are not {where}; "
                             "put the shared file written by `compress --joint` beside it (a server: PUT "
                             f"/v1/shared/{sha})")
    data = found.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise SharedLLMError(f"{found}: sha256 {got}, but {source} needs the shared bases of sha256 {sha}")
    shared = parse_shared(data, str(found), base_fingerprint)
    with _CACHE_LOCK:
        _CACHE[sha] = shared
        while len(_CACHE) > CACHE_ENTRIES:
            _CACHE.popitem(last=False)
    return shared


def check_upload(data: bytes, sha: str, base_fingerprint: str, source: str) -> Shared:
    """A shared file sent to the server as `sha`: its sha256 is `sha`, it parses and is bound to this base."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise SharedLLMError(f"{source}: the body's sha256 is {got}, not {sha}")
    return parse_shared(data, source, base_fingerprint)


# ---- loading a core file ----------------------------------------------------------------------------------------
@torch.no_grad()
def materialise(tensors: dict, meta: dict, layout, source: str, shared: Shared) -> dict:
    """A parsed core file + its shared bases -> the named tensors of an ordinary LoRA on `layout` (its method's
    (name, shape) list for the core file's method_config), refusing cores or sites that do not fit."""
    j = meta["joint"]
    k = j["rank"]
    if shared.rank != k or shared.config.rank != j["source_rank"] or shared.config.alpha != j["source_alpha"]:
        raise SharedLLMError(f"{source}: joint rank {k} of a rank-{j['source_rank']} LoRA (alpha "
                             f"{j['source_alpha']}), its shared file: rank {shared.rank} of rank {shared.config.rank} "
                             f"(alpha {shared.config.alpha})")
    cores = wire.decode_adapter(tensors, meta, [(s + CORE, (k, k)) for s in shared.sites], {}, source)
    config = config_from_json("lora", meta["method_config"], source)
    r, scale = config.rank, config.alpha / config.rank
    named = {}
    for site, (u, v) in shared.sites.items():
        p, s, qh = torch.linalg.svd(cores[site + CORE].double())
        root = s[:r].sqrt()
        named[site + A_KEY] = (root[:, None] * (qh[:r] @ v.double().t())).float()
        named[site + B_KEY] = ((u.double() @ p[:, :r]) * root[None, :] / scale).float()
    want = dict(layout)
    if {n: tuple(t.shape) for n, t in named.items()} != {n: tuple(s) for n, s in want.items()}:
        raise SharedLLMError(f"{source}: the shared bases' sites do not match a LoRA of "
                             f"{config_to_json(config)} on this base")
    flat = torch.cat([named[n].reshape(-1) for n in want])
    if not torch.isfinite(flat).all():
        raise SharedLLMError(f"{source}: materialised LoRA has non-finite values")
    wire.check_bound(flat, source)
    return {n: named[n] for n in want}


def decode(tensors: dict, meta: dict, layout, base_state: dict, source: str, dirs, base_fingerprint: str) -> dict:
    """wire.decode_adapter, or for a joint core file its materialised LoRA (shared bases looked up in `dirs`)."""
    if "joint" not in meta:
        return wire.decode_adapter(tensors, meta, layout, base_state, source)
    shared = load_shared(meta["joint"]["shared_sha256"], dirs, source, base_fingerprint)
    return materialise(tensors, meta, layout, source, shared)


def max_shared_bytes(linear_shapes: dict) -> int:
    """The largest shared file on a base (every decoder linear at MAX_JOINT_RANK, fp32) + 1 MiB for the header."""
    return 4 * wire.MAX_JOINT_RANK * sum(i + o for i, o in linear_shapes.values()) + (1 << 20)
