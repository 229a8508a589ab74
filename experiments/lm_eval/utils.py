"""lm-eval loads the local tasks' documents from the JSONL beside this file (no dataset hub; any working folder)."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def austen_next(**kwargs):
    return _load("austen_next.jsonl")


def austen_complete(**kwargs):
    return _load("austen_complete.jsonl")
