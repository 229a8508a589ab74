"""Shared pieces of the bets: users, eval texts, and trained adapters cached under out/ (reused across bets)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sharedllm.atomic import write_text_atomic
from sharedllm.base import Base
from sharedllm.data import disjoint_slices, load_user
from sharedllm.personalise import load_adapted, personalise, save_adapted
from sharedllm.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPORA = REPO / "data" / "corpora"
OUT = REPO / "out"
USERS = {"programmer": "programmer/cpython_asyncio", "novelist": "novelist/austen_pride_and_prejudice",
         "scientist": "scientist/arxiv_astro_ph"}
GENERAL = "general/wikipedia_squad_paragraphs"
EVAL_TEXTS, EVAL_LEN = 3, 2048


def user_file(corpora: Path, rel: str) -> Path:
    return Path(corpora) / f"{rel}.txt"


def eval_texts(base: Base, corpora: Path, rel: str, count: int = EVAL_TEXTS, length: int = EVAL_LEN) -> list:
    """Three disjoint eval texts of `length` tokens from the held-out last 20 % of the user's file."""
    return disjoint_slices(load_user(user_file(corpora, rel), base.tokenizer).heldout, count, length)


def adapter_path(base: Base, user: str, method: str, cfg: TrainConfig, tag: str = "", root: Path = OUT) -> Path:
    name = f"{method}{tag}_seed{cfg.seed}_steps{cfg.steps}_b{cfg.batch}x{cfg.seq}_lr{cfg.lr:g}.safetensors"
    return Path(root) / "adapters" / base.fingerprint[:16] / user.replace("/", "__") / name


def ensure_adapter(base: Base, user: str, train_tokens: torch.Tensor, method: str, cfg: TrainConfig,
                   tag: str = "", force: bool = False, root: Path = OUT) -> Path:
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


def adapted_model(base: Base, path: Path):
    return load_adapted(base, path).model
