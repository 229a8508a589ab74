"""A user's text -> tokens -> train pool / held-out split by position -> windows and batches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SharedLLMError

TRAIN_FRACTION = 0.8


def _read_one(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise SharedLLMError(f"{path}: looks binary (contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SharedLLMError(f"{path}: not valid UTF-8 at byte {e.start}; give a UTF-8 text file") from None


def read_user_text(path) -> str:
    """A file, or every regular non-hidden file under a folder (sorted, joined by blank lines)."""
    path = Path(path)
    if not path.exists():
        raise SharedLLMError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise SharedLLMError(f"{path}: folder contains no files")
        text = "\n\n".join(_read_one(p) for p in files)
    else:
        text = _read_one(path)
    if not text.strip():
        raise SharedLLMError(f"{path}: the text is empty")
    return text


def split_by_position(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """First part trains, last part is held out: a later 'time slice' of the same author."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


@dataclass
class UserData:
    """Token ids of a user's training pool and held-out slice."""

    source: str
    train: torch.Tensor
    heldout: torch.Tensor

    def check(self, seq: int, window: int) -> "UserData":
        if len(self.train) < seq + 1:
            raise SharedLLMError(f"{self.source}: training pool has {len(self.train)} tokens, fewer than one "
                                 f"training window of {seq + 1}; give more text or a smaller --seq")
        if len(self.heldout) < window + 1:
            raise SharedLLMError(f"{self.source}: held-out slice has {len(self.heldout)} tokens, fewer than one "
                                 f"evaluation window of {window + 1}; give more text or a smaller --window")
        return self


def load_user(path, tokenizer) -> UserData:
    train, heldout = split_by_position(read_user_text(path))
    enc = lambda s: torch.tensor(tokenizer.encode(s), dtype=torch.long)  # noqa: E731
    return UserData(source=str(path), train=enc(train), heldout=enc(heldout))


def eval_windows(tokens: torch.Tensor, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of window+1 tokens (inputs + shifted targets), as a [n, window+1] tensor.

    Each window predicts `window` tokens; consecutive windows share one boundary token so that every
    target token is predicted exactly once. `max_tokens` caps the number of predicted tokens.
    """
    n = (len(tokens) - 1) // window
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // window))
    return torch.stack([tokens[i * window: i * window + window + 1] for i in range(n)]) if n else \
        torch.empty(0, window + 1, dtype=torch.long)


def disjoint_slices(tokens: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` disjoint consecutive slices of `length`+1 tokens each (the bets' three eval texts)."""
    need = count * length + 1
    if len(tokens) < need:
        raise SharedLLMError(f"held-out slice has {len(tokens)} tokens; {count} eval texts of {length} need {need}")
    return [tokens[i * length: (i + 1) * length + 1] for i in range(count)]


def dev_slice(tokens: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """The development text: `length`+1 held-out tokens after the `count` eval texts, sharing no token with them.

    Every choice a bet makes (learning rate, method, repair steps) is made on this slice, never on the eval texts;
    the training pool (the first 80 %) is disjoint from both by construction."""
    start = count * length + 1  # the eval texts cover tokens [0, count * length]
    need = start + length + 1
    if len(tokens) < need:
        raise SharedLLMError(f"held-out slice has {len(tokens)} tokens; {count} eval texts of {length} plus a dev "
                             f"text of {length} need {need}")
    return tokens[start: need]


def batch_sampler(tokens: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless random training windows [batch, seq+1] from the training pool, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    high = len(tokens) - seq
    while True:
        starts = torch.randint(0, high, (batch,), generator=gen)
        yield torch.stack([tokens[s: s + seq + 1] for s in starts.tolist()])
