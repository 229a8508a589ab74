"""Calibration text for base quantisation: general text, never a user's."""
from __future__ import annotations

import torch

from ..data import read_user_text, split_by_position


def calibration_tokens(path, tokenizer) -> torch.Tensor:
    """The first 80 % of a general text (the last 20 % stays free for evaluating the result)."""
    train, _ = split_by_position(read_user_text(path))
    return torch.tensor(tokenizer.encode(train), dtype=torch.long)
