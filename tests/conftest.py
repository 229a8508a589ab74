import random
from pathlib import Path

import pytest

from sharedllm.base import load_base

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"


@pytest.fixture(scope="session")
def tiny():
    return load_base("tiny")


def english(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "from", "dog", "quick", "brown"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rng.choice(words))
    return " ".join(out) + "\n"


@pytest.fixture
def user_text(tmp_path) -> Path:
    p = tmp_path / "user.txt"
    p.write_text(english(6000))
    return p
