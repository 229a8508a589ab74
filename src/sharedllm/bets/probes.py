"""Things the bets do to a model beyond plain scoring: Gaussian noise on every block's output (Bet 63),
probability-averaging ensembles (Bet 55), and averaging adapter states (Bet 54)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch


def decoder_layers(model) -> list:
    """Every transformer block (LlamaDecoderLayer, Qwen2DecoderLayer, ...) in order."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no *DecoderLayer modules to hook")
    return layers


@contextmanager
def block_noise(model, sigma_rel: float, seed: int):
    """Add N(0, (sigma_rel * RMS(h))^2) to each block's output h, RMS taken per token over the hidden size.

    The noise is reproducible from `seed` (one generator for the whole forward pass), so two models scored
    under the same seed see the same standard-normal draws."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)

    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        rms = h.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        noisy = h + (sigma_rel * rms * torch.randn(h.shape, generator=gen, device=h.device)).to(h.dtype)
        return (noisy,) + tuple(out[1:]) if isinstance(out, tuple) else noisy

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def ensemble_nll(models: list, windows: torch.Tensor, batch: int = 2) -> float:
    """Summed NLL (nats) of `windows` [n, L+1] under the mean of the models' next-token probabilities."""
    device = next(models[0].parameters()).device
    total, log_k = 0.0, math.log(len(models))
    for i in range(0, len(windows), batch):
        w = windows[i: i + batch].to(device)
        logps = torch.stack([torch.log_softmax(m(input_ids=w[:, :-1]).logits.float(), dim=-1) for m in models])
        mix = torch.logsumexp(logps, dim=0) - log_k
        total -= mix.gather(-1, w[:, 1:].unsqueeze(-1)).sum().item()
    return total


def mean_state(states: list[dict]) -> dict:
    """Element-wise mean of adapter states with identical names and shapes."""
    names = list(states[0])
    if any(list(s) != names for s in states):
        raise ValueError("adapter states differ in their tensor names")
    return {n: torch.stack([s[n].float() for s in states]).mean(dim=0) for n in names}
