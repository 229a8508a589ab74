"""Shared pieces of the bets: the eval budget, user files, and trained adapters cached under the artefact folder (reused across bets)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sharedllm.atomic import write_text_atomic
from sharedllm.base import Base
from sharedllm.personalise import personalise, save_adapted
from sharedllm.snapshot import Snapshot, beside, for_method, run_key
from sharedllm.train import TrainConfig, autocast  # noqa: F401  (autocast: the bets' --dtype)

GENERAL = "general/wikipedia_squad_paragraphs"  # general text: forgetting checks, calibration of the ternary base
EVAL_TEXTS, EVAL_LEN = 3, 2048


def user_file(corpora: Path, rel: str) -> Path:
    return Path(corpora) / f"{rel}.txt"


def adapter_path(base: Base, user: str, method: str, cfg: TrainConfig, tag: str, root: Path,
                 dtype: str = "fp32") -> Path:
    """Where the adapter trained with `cfg` lives; one trained in another compute dtype than fp32 has its own file
    (`..._bf16.safetensors`), so it is never taken for the fp32 one."""
    name = (f"{method}{tag}_seed{cfg.seed}_steps{cfg.steps}_b{cfg.batch}x{cfg.seq}_lr{cfg.lr:g}"
            f"{'' if dtype == 'fp32' else '_' + dtype}.safetensors")
    return Path(root) / "adapters" / base.fingerprint[:16] / user.replace("/", "__") / name


def _trained(path: Path, dtype: str) -> bool:
    """The adapter and its sidecar are on disk, trained in `dtype` (a file of another dtype is trained again)."""
    side = path.with_suffix(".json")
    return path.is_file() and side.is_file() and json.loads(side.read_text()).get("dtype", "fp32") == dtype


def _save(adapted, path: Path, base: Base, spec: "AdapterSpec", method: str, dtype: str, **extra) -> None:
    """The adapter file, then its JSON sidecar (the whole loss curve, wall seconds, dtype when not fp32)."""
    save_adapted(adapted, path, base, info=None if dtype == "fp32" else {"compute_dtype": dtype})
    side = {"user": spec.user, "method": method, "tag": spec.tag, "train": spec.cfg.to_json(),
            "losses": adapted.result.losses, "wall_s": adapted.result.wall_s, "steps": adapted.result.steps,
            "params": adapted.n_params, **({} if dtype == "fp32" else {"dtype": dtype}), **extra}
    if adapted.result.resumed_at:
        side["resumed_at_step"] = adapted.result.resumed_at  # trained in two runs or more (sharedllm.snapshot)
    write_text_atomic(path.with_suffix(".json"), json.dumps(side))


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to train: whose (the name its file is kept under), on which tokens, with which budget."""
    user: str
    tokens: torch.Tensor
    cfg: TrainConfig
    tag: str = ""


def ensure_adapter(base: Base, user: str, train_tokens: torch.Tensor, method: str, cfg: TrainConfig,
                   tag: str, root: Path, force: bool = False, dtype: str = "fp32") -> Path:
    """Train once and reuse: the adapter file plus a JSON sidecar with the whole loss curve (and the compute dtype,
    when not fp32: a file whose sidecar names another dtype is trained again, not reused)."""
    path = adapter_path(base, user, method, cfg, tag, root, dtype)
    if _trained(path, dtype) and not force:
        return path
    spec = AdapterSpec(user, train_tokens, cfg, tag)
    snapshot = for_method(method, beside(path), snapshot_key(base, [spec], method, dtype))
    with autocast(dtype, str(base.device)):
        adapted = personalise(base, train_tokens.to(base.device), method, cfg, label=f"{user} {method}{tag}",
                              snapshot=snapshot)
    _save(adapted, path, base, spec, method, dtype)
    snapshot.clear()
    return path


def snapshot_key(base: Base, specs: list, method: str, dtype: str) -> dict:
    """What a training snapshot of these adapters must match to be resumed (sharedllm.snapshot.run_key)."""
    return run_key(base.fingerprint, method, dtype,
                   [{"user": s.user, "tag": s.tag, "cfg": s.cfg, "tokens": s.tokens} for s in specs])


def ensure_norm_adapters(base: Base, specs: list, root: Path, dtype: str = "fp32") -> list:
    """Norm adapters of several users, trained together in one pass (`sharedllm.fleet.train_fleet`: each row scaled
    by its own user's gains, each user's own loss, batches and AdamW state, so each equals training alone up to float
    rounding) and saved where `ensure_adapter` keeps them, so that it finds them. Those already on disk are reused.
    A sidecar records the pass: `wall_s` is this adapter's share (the pass's wall seconds / users in it), `fleet`
    the pass itself. Returns the paths, in the order of `specs`."""
    from sharedllm.fleet import train_fleet

    paths = [adapter_path(base, s.user, "norm", s.cfg, s.tag, root, dtype) for s in specs]
    todo = {str(i): s for i, (s, p) in enumerate(zip(specs, paths)) if not _trained(p, dtype)}
    if not todo:
        return paths
    names = ", ".join(f"{s.user}{s.tag}" for s in todo.values())
    key = snapshot_key(base, list(todo.values()), "norm", dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    snapshot = Snapshot(paths[int(next(iter(todo)))].parent / f"fleet-{digest}.snapshot.safetensors", key)
    adapted = train_fleet(base, {k: s.tokens.to(base.device) for k, s in todo.items()},
                          {k: s.cfg for k, s in todo.items()}, label=f"norm x{len(todo)} ({names})", dtype=dtype,
                          snapshot=snapshot)
    for k, s in todo.items():
        one = adapted[k]
        fleet = {"users": len(todo), "wall_s": round(one.result.wall_s, 1), "cpu_s": round(one.result.cpu_s, 1)}
        one.result.wall_s /= len(todo)
        _save(one, paths[int(k)], base, s, "norm", dtype, fleet=fleet)
    snapshot.clear()
    return paths


def sidecar(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())
