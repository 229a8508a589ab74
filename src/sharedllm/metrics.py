"""Metrics as pure functions, plus the one function that scores a model on windows."""
from __future__ import annotations

import math

import torch

from .log import progress
from .losses import next_token_nll


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Token perplexity: exp(mean negative log-likelihood in nats)."""
    return math.exp(nll_sum / n_tokens)


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) expressed in bits per UTF-8 byte of the scored text."""
    return nll_sum / math.log(2) / n_bytes


@torch.no_grad()
def score_windows(model, windows: torch.Tensor, batch: int = 4) -> float:
    """Summed NLL (nats) of every target token of `windows` [n, L+1] under `model`."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in progress(range(0, len(windows), batch), desc="score", unit="batch"):
        w = windows[i: i + batch].to(device)
        total += next_token_nll(model, w).sum().item()
    return total


def evaluate(model, tokenizer, windows: torch.Tensor) -> dict:
    """Token ppl and bits/byte over non-overlapping windows; the window length is part of the result."""
    nll = score_windows(model, windows)
    n_tokens = windows[:, 1:].numel()
    n_bytes = sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in windows)
    return {"ppl": perplexity(nll, n_tokens), "bits_per_byte": bits_per_byte(nll, max(n_bytes, 1)),
            "nll": nll, "tokens": n_tokens, "window": windows.shape[1] - 1}
