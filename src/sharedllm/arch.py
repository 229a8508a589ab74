"""What a frozen base is, independent of where it was loaded from: the `Base` record, its fingerprint, freezing,
and the architecture helpers every adapter and the server share (RMSNorm discovery and the gain convention)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .errors import SharedLLMError


@dataclass
class Base:
    """A frozen base: the model (eval mode, no grads), its tokenizer, its fingerprint and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    name: str
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict in name order: name, dtype, shape, then raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():  # hashed in place (no bytes copy): same digest, half the time on a multi-GB base
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter requires grad; returns the same model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def norm_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every RMSNorm module (Llama, Qwen2, Mistral, Gemma...) by its qualified name."""
    return {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}


def gain_offset(module: torch.nn.Module) -> float:
    """Gemma stores RMSNorm gains as w with effective gain (1 + w); everyone else uses w directly."""
    return 1.0 if "Gemma" in type(module).__name__ else 0.0


def check_rmsnorm(model: torch.nn.Module, name: str) -> None:
    if not norm_modules(model):
        raise SharedLLMError(f"base {name}: no RMSNorm modules found; sharedllm needs an RMSNorm model "
                             "(Llama, Qwen2, Mistral, Gemma)")
