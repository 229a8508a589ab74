"""Hierarchical adapters: a **group** adapter (a LoRA trained on the pooled text of a cluster of users, shared by
all of them) and each user's small adapter trained **on top** of it (`sharedllm adapt --on-top GROUP`).

The per-user file is bound to the base *and* to the group file: its `base_fingerprint` is sha256("<base
fingerprint>+<group file sha256>") and its metadata `on_top` names the group file (sha256, file name, method), so
it loads nowhere else. Training and `eval` run on a private copy of the base with the group merged into its weights
(personalise.stacked_base builds that copy); `serve` runs the group as its own per-row part beside the user's part (norm gains and a LoRA's deltas compose row by
row: adapters/rows.py), which is the same function as the merged weights. The group file is found by sha256: beside
the user's file (under its recorded name) or in a server store's `shared/` (`PUT /v1/shared/{sha256}`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import SharedLLMError

ON_TOP = "on_top"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stacked_fingerprint(base_fingerprint: str, group_sha: str) -> str:
    """What a per-user adapter on top of the group file `group_sha` is bound to."""
    return hashlib.sha256(f"{base_fingerprint}+{group_sha}".encode()).hexdigest()


def group_method(meta: dict, source: str):
    """The group file's method, which must be a low-rank one (a LoRA): its change merges into the weights."""
    from .adapters import get_method

    if not isinstance(meta.get("method"), str):
        raise SharedLLMError(f"{source}: not a sharedllm adapter file (no method in its metadata)")
    method = get_method(meta["method"], meta.get("method_config"))
    if ON_TOP in meta:
        raise SharedLLMError(f"{source}: a group adapter must be trained on the base itself, not on top of another "
                             "group (one level)")
    if not method.caps.low_rank:
        raise SharedLLMError(f"{source}: a group adapter must be a LoRA (its change merges into the base's "
                             f"weights), not {method.name!r}")
    return method


def on_top_meta(group_path: Path, stacked) -> dict:
    """The `on_top` metadata of a part trained on `stacked` (personalise.stacked_base of the group file)."""
    return {ON_TOP: {**stacked.meta[ON_TOP], "file": Path(group_path).name}}


def is_adapter_file(data: bytes) -> bool:
    """Whether `data` carries sharedllm adapter metadata (a group adapter sent to PUT /v1/shared/...), judged from
    its checked header alone; the full parse comes after."""
    from . import wire

    try:
        meta = wire.header_meta(wire.read_header(data, "upload"), "upload")
    except SharedLLMError:
        return False
    return isinstance(meta, dict) and meta.get("format") == wire.FORMAT


def find_group(meta: dict, dirs: list, source: str) -> bytes:
    """The group file a per-user file names, by sha256: its recorded name in each of `dirs`, then
    <dir>/<sha256>.safetensors (a server store's shared/); refused when absent or when the bytes do not hash to the
    recorded sha256."""
    want = meta[ON_TOP]
    for d in dirs:
        for candidate in (Path(d) / want["file"], Path(d) / f"{want['sha256']}.safetensors"):
            if candidate.is_file():
                data = candidate.read_bytes()
                if sha256_of(data) == want["sha256"]:
                    return data
    raise SharedLLMError(f"{source}: trained on top of group adapter {want['file']!r} (sha256 "
                         f"{want['sha256'][:16]}...), which is not beside it or in any shared folder given; put that "
                         "exact file beside it (or, on a server, PUT it to /v1/shared/{sha256} first)")


def check_group(data: bytes, base_fingerprint: str, source: str) -> dict:
    """The group file's metadata, refused (naming `source`) unless it parses and is a LoRA trained on the base with
    this fingerprint: what a driver checks before sending the group to workers that load the base themselves."""
    from . import wire

    _, meta = wire.parse_file(data, source)
    group_method(meta, source)
    wire.check_binding(meta, base_fingerprint, source)
    return meta


def keep_beside(data: bytes, name: str, folder) -> Path:
    """The group file where find_group looks from a part in `folder`: under its own name, or under its sha256 when
    another file has that name; written (atomically) only when it is not there already."""
    from .atomic import write_bytes_atomic

    sha = sha256_of(data)
    for path in (Path(folder) / name, Path(folder) / f"{sha}.safetensors"):
        if not path.exists():
            return write_bytes_atomic(path, data)
        if path.is_file() and sha256_of(path.read_bytes()) == sha:
            return path
    raise SharedLLMError(f"{folder}: {name} and {sha}.safetensors are both other files; cannot keep the group "
                         "adapter beside its users' parts")
