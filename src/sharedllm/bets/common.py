"""Shared pieces of the bets: the eval budget, user files, and trained adapters cached under the artefact folder (reused across bets)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sharedllm.atomic import write_text_atomic
from sharedllm.base import Base
from sharedllm.personalise import personalise, save_adapted
from sharedllm.train import TrainConfig

GENERAL = "general/wikipedia_squad_paragraphs"  # general text: forgetting checks, calibration of the ternary base
EVAL_TEXTS, EVAL_LEN = 3, 2048


def user_file(corpora: Path, rel: str) -> Path:
    return Path(corpora) / f"{rel}.txt"


def adapter_path(base: Base, user: str, method: str, cfg: TrainConfig, tag: str, root: Path) -> Path:
    name = f"{method}{tag}_seed{cfg.seed}_steps{cfg.steps}_b{cfg.batch}x{cfg.seq}_lr{cfg.lr:g}.safetensors"
    return Path(root) / "adapters" / base.fingerprint[:16] / user.replace("/", "__") / name


def ensure_adapter(base: Base, user: str, train_tokens: torch.Tensor, method: str, cfg: TrainConfig,
                   tag: str, root: Path, force: bool = False) -> Path:
    """Train once and reuse: the adapter file plus a JSON sidecar with the whole loss curve."""
    path = adapter_path(base, user, method, cfg, tag, root)
    if path.is_file() and path.with_suffix(".json").is_file() and not force:
        return path
    adapted = personalise(base, train_tokens.to(base.device), method, cfg, label=f"{user} {method}{tag}")
    save_adapted(adapted, path, base)
    side = {"user": user, "method": method, "tag": tag, "train": cfg.to_json(), "losses": adapted.result.losses,
            "wall_s": adapted.result.wall_s, "steps": adapted.result.steps, "params": adapted.n_params}
    write_text_atomic(path.with_suffix(".json"), json.dumps(side))
    return path


def sidecar(path: Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())
