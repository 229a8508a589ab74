"""Joint compression of a cohort of LoRAs (`sharedllm compress --joint`; after "Compress then Serve", ICML 2025).

Per site (a targeted linear of one layer) each user's change D_u = s B_u A_u [N, K] is written U C_u V^T: bases
U [N, Kj] and V [K, Kj] (orthonormal columns) shared by the cohort, and a per-user core C_u = U^T D_u V [Kj, Kj]
(for given U and V the best core). U is the top-Kj left singular vectors of [D_1 ... D_n] (side by side), V those
of [D_1^T ... D_n^T], computed in float64 from the low-rank factors: D_u D_u^T = L_u L_u^T with L_u = s B_u Ra_u^T
(A_u^T = Qa_u Ra_u, thin QR), so only an N x (n r) matrix is decomposed. `iters` alternating steps (Tucker-2 /
HOOI: U from [D_u V]_u, then V from [D_u^T U]_u) can only raise sum_u ||C_u||^2, i.e. lower the error.

Error bound (iters = 0), per site: with t_L, t_R the squared singular values beyond Kj of the two stacks,
max(t_L, t_R) <= sum_u ||D_u - U C_u V^T||_F^2 <= t_L + t_R; zero once Kj >= the stacks' rank (at most n r).

Files: DIR/shared-<sha256[:16]>.safetensors (format `sharedllm-lora-bases`, bound to the base) holds every site's
U and V once, one flat F32 tensor `bases` in site order; each DIR/<user>.safetensors is an ordinary adapter file
(method lora) whose `joint` metadata names the shared file by its full sha256 and whose one tensor holds the user's
cores in the shared file's site order. Loading (`decode`) finds the shared file by name in the core file's folder
(or the server store's `shared/`), verifies its sha256, and materialises an ordinary LoRA: rank(C_u) <= r (the
source rank), so with C_u = P S Q^T, B' = U P_r S_r^(1/2) / s' and A' = S_r^(1/2) Q_r^T V^T give s' B' A' =
U C_u V^T exactly at rank r' = min(Kj, r), which the per-row LoRA kernel serves unchanged.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from .. import __version__, wire
from ..adapters import METHODS, adapter_state, config_from_json, config_to_json
from ..adapters.lora import LoraConfig
from ..atomic import write_bytes_atomic
from ..errors import SharedLLMError
from .joint_files import (CORE, SHARED_FIELDS, SHARED_FORMAT, Shared, _CACHE, check_upload,  # noqa: F401
                          decode, load_shared, materialise, max_shared_bytes, parse_shared, shared_name)
from .lora_rank import A_KEY, B_KEY, truncated_config


# ---- compression ------------------------------------------------------------------------------------------------
def site_factors(adapted) -> dict:
    """site -> (A [r, K], s B [N, r]) of a loaded LoRA, float64."""
    named, c = adapter_state(adapted.params), adapted.config
    s = c.alpha / c.rank
    return {n[: -len(A_KEY)]: (a.double(), s * named[n[: -len(A_KEY)] + B_KEY].double())
            for n, a in named.items() if n.endswith(A_KEY)}


def _top(m: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(m, full_matrices=False)[0][:, :k]


def site_bases(factors: list, k: int, iters: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The cohort's (U [N, k], V [K, k]) at one site from every user's (A, s B)."""
    left = torch.cat([sb @ torch.linalg.qr(a.t())[1].t() for a, sb in factors], 1)
    right = torch.cat([a.t() @ torch.linalg.qr(sb)[1].t() for a, sb in factors], 1)
    u, v = _top(left, k), _top(right, k)
    for _ in range(iters):
        u = _top(torch.cat([sb @ (a @ v) for a, sb in factors], 1), k)
        v = _top(torch.cat([a.t() @ (sb.t() @ u) for a, sb in factors], 1), k)
    return u, v


def check_cohort(adapters: dict, k: int) -> LoraConfig:
    """Every adapter a LoRA of one config (rank, alpha, targets) and one set of sites; 1 <= k <= the cohort's
    total rank, the smallest site dimension and MAX_JOINT_RANK. -> the config."""
    if not adapters:
        raise SharedLLMError("--joint needs at least one LoRA adapter")
    first = next(iter(adapters.values()))
    for user, ad in adapters.items():
        if not isinstance(ad.config, LoraConfig):
            raise SharedLLMError(f"{user}: --joint compresses LoRA adapters; this one is {ad.method!r}")
        if ad.config != first.config:
            raise SharedLLMError(f"{user}: LoRA config {config_to_json(ad.config)} differs from the cohort's "
                                 f"{config_to_json(first.config)}; a joint cohort shares one rank, alpha and targets")
    sites = {n: tuple(p.shape) for n, p in first.params.items()}
    for user, ad in adapters.items():
        if {n: tuple(p.shape) for n, p in ad.params.items()} != sites:
            raise SharedLLMError(f"{user}: its LoRA tensors differ from the cohort's (another base?)")
    dims = [shape[1] if n.endswith(A_KEY) else shape[0] for n, shape in sites.items()]
    most = min(len(adapters) * first.config.rank, *dims, wire.MAX_JOINT_RANK)
    if not (isinstance(k, int) and 1 <= k <= most):
        raise SharedLLMError(f"--joint-rank {k}: {len(adapters)} users of rank {first.config.rank} on this base take "
                             f"a joint rank in 1..{most}")
    return first.config


@torch.no_grad()
def compress_cohort(adapters: dict, k: int, iters: int = 0) -> tuple[dict, dict, dict]:
    """{user: loaded LoRA} -> (bases {site: (U, V)}, cores {user: {site: C}}, {user: relative error}), float64;
    the relative error is ||D - U C V^T||_F / ||D||_F over all of a user's sites."""
    check_cohort(adapters, k)
    factors = {u: site_factors(ad) for u, ad in adapters.items()}
    sites = list(next(iter(factors.values())))
    bases, cores = {}, {u: {} for u in adapters}
    total, kept = dict.fromkeys(adapters, 0.0), dict.fromkeys(adapters, 0.0)
    for site in sites:
        fs = [factors[u][site] for u in adapters]
        u_, v_ = bases[site] = site_bases(fs, k, iters)
        for user, (a, sb) in zip(adapters, fs):
            c = cores[user][site] = (u_.t() @ sb) @ (a @ v_)
            total[user] += float((sb @ torch.linalg.qr(a.t())[1].t()).pow(2).sum())  # ||D||_F^2
            kept[user] += float(c.pow(2).sum())  # ||U C V^T||_F^2 (a projection of D)
    errors = {u: math.sqrt(max(0.0, total[u] - kept[u]) / total[u]) if total[u] > 0 else 0.0 for u in adapters}
    return bases, cores, errors


def shared_bytes(bases: dict, config: LoraConfig, k: int, base_fingerprint: str, users: int, iters: int) -> bytes:
    flat = torch.cat([t.reshape(-1) for u, v in bases.values() for t in (u, v)]).float()
    meta = {"format": SHARED_FORMAT, "format_version": 1, "base_fingerprint": base_fingerprint, "rank": k,
            "sites": [[s, int(u.shape[0]), int(v.shape[0])] for s, (u, v) in bases.items()],
            "method_config": config_to_json(config), "users": users, "iters": iters, "version": __version__}
    return wire.adapter_bytes({"bases": flat}, meta)


def core_bytes(adapted, cores: dict, sha: str, k: int, rel_error: float) -> bytes:
    """A user's core file: their metadata (training record...) kept, the cores as one float16 tensor."""
    from .compress import encoded

    c = adapted.config
    layout = [(site + CORE, (k, k)) for site in cores]
    flat = torch.cat([t.reshape(-1) for t in cores.values()]).float()
    joint = {"shared_sha256": sha, "rank": k, "source_rank": c.rank, "source_alpha": c.alpha,
             "rel_error": round(min(1.0, rel_error), 6)}
    out = materialised_config(c, k)
    return encoded(flat, layout, None, adapted.meta or {}, "float16",
                   {"joint": joint, "method_config": config_to_json(out)})


def materialised_config(source: LoraConfig, k: int) -> LoraConfig:
    """The LoRA a core file loads as: rank min(k, source rank), alpha keeping the source's scale (lora_rank)."""
    return truncated_config(source, min(k, source.rank))


def lora_layout(base, config: LoraConfig) -> list:
    """The (name, shape) list of a LoRA of `config` on `base` (attached once to a weightless copy)."""
    from ..adapters import get_method, shared_copy

    method = get_method("lora", config)
    return wire.layout_of(method.trainable(method.attach(shared_copy(base.model))))


def read_cohort(base, files) -> dict:
    """{file stem: Adapted without a model (params: its named fp32 tensors)} of LoRA files, each checked as
    load_adapted checks it (a joint core file is materialised)."""
    from ..personalise import Adapted

    out, layouts = {}, {}
    for path in files:
        tensors, meta = wire.read_file(path)
        wire.check_binding(meta, base.fingerprint, str(path))
        if not (meta["method"] in METHODS and METHODS[meta["method"]].caps.low_rank):
            raise SharedLLMError(f"{path}: --joint compresses LoRA adapters; this one is {meta['method']!r}")
        config = config_from_json("lora", meta.get("method_config", {}), str(path))
        if config not in layouts:
            layouts[config] = lora_layout(base, config)
        named = decode(tensors, meta, layouts[config], {}, str(path), [path.parent], base.fingerprint)
        out[path.stem] = Adapted(model=None, params=named, method="lora", meta=meta, config=config)
    return out


def compress_dir(base, src, out, k: int, iters: int = 0) -> dict:
    """Every LoRA file in folder `src` (sorted; shared-*.safetensors skipped) -> `out`/shared-<sha>.safetensors and
    `out`/<user>.safetensors; every core file is loaded back before anything is written. -> a report."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise SharedLLMError(f"--adapters {src}: not a folder")
    files = sorted(p for p in src.glob("*.safetensors") if not p.name.startswith(("shared-", ".")))
    adapters = read_cohort(base, files)
    config = check_cohort(adapters, k)
    bases, cores, errors = compress_cohort(adapters, k, iters)
    shared = shared_bytes(bases, config, k, base.fingerprint, len(adapters), iters)
    sha = hashlib.sha256(shared).hexdigest()
    blobs = {u: core_bytes(adapters[u], cores[u], sha, k, errors[u]) for u in adapters}
    parsed = parse_shared(shared, shared_name(sha), base.fingerprint)
    layout = lora_layout(base, materialised_config(config, k))
    for user, blob in blobs.items():  # what we write must load on this base
        tensors, meta = wire.parse_file(blob, f"{out / user}.safetensors")
        materialise(tensors, meta, layout, f"{out / user}.safetensors", parsed)
    write_bytes_atomic(out / shared_name(sha), shared)  # the shared file first: no core file without it
    for user, blob in blobs.items():
        write_bytes_atomic(out / f"{user}.safetensors", blob)
    n = len(blobs)
    per_user = sum(len(b) for b in blobs.values()) / n
    raw = sum(p.stat().st_size for p in files) / n
    return {"users": n, "joint_rank": k, "iters": iters, "source_rank": config.rank,
            "shared": str(out / shared_name(sha)),
            "shared_sha256": sha, "shared_bytes": len(shared), "bytes_per_user": round(per_user),
            "raw_bytes_per_user": round(raw), "bytes_215k": round(per_user * 215_000 + len(shared)),
            "raw_bytes_215k": round(raw * 215_000),
            "per_user": {u: {"bytes": len(blobs[u]), "rel_error": round(errors[u], 6)} for u in blobs}}
