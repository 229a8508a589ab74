"""Shared pieces of the bets: the eval budget, user files, and trained adapters cached under the artefact folder (reused across bets)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sharedllm.atomic import write_text_atomic
from sharedllm.base import Base
from sharedllm.personalise import personalise, save_adapted
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


def ensure_adapter(base: Base, user: str, train_tokens: torch.Tensor, method: str, cfg: TrainConfig,
                   tag: str, root: Path, force: bool = False, dtype: str = "fp32") -> Path:
    """Train once and reuse: the adapter file plus a JSON sidecar with the whole loss curve (and the compute dtype,
    when not fp32: a file whose sidecar names another dtype is trained again, not reused)."""
    path = adapter_path(base, user, method, cfg, tag, root, dtype)
    side_path = path.with_suffix(".json")
    if path.is_file() and side_path.is_file() and not force:
        if json.loads(side_path.read_text()).get("dtype", "fp32") == dtype:
            return path
    with autocast(dtype, str(base.device)):
        adapted = personalise(base, train_tokens.to(base.device), method, cfg, label=f"{user} {method}{tag}")
    save_adapted(adapted, path, base, info=None if dtype == "fp32" else {"compute_dtype": dtype})
    side = {"user": user, "method": method, "tag": tag, "train": cfg.to_json(), "losses": adapted.result.losses,
            "wall_s": adapted.result.wall_s, "steps": adapted.result.steps, "params": adapted.n_params,
            **({} if dtype == "fp32" else {"dtype": dtype})}
    write_text_atomic(side_path, json.dumps(side))
    return path


def sidecar(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())
