"""The adapter registry: one name per method, one file per method, one small contract.

A method is an object with:
  name                      the registry key, also written into every adapter file
  attach(model) -> model    prepare a private copy of the base (may wrap it, e.g. PEFT)
  trainable(model) -> dict  canonical tensor name -> nn.Parameter: exactly what trains and what is saved
Everything else (freezing, saving, loading) is generic and lives here.
"""
from __future__ import annotations

import copy

import torch

from ..errors import SharedLLMError

METHODS: dict[str, object] = {}


def register(method):
    METHODS[method.name] = method
    return method


def get_method(name: str):
    if name not in METHODS:
        raise SharedLLMError(f"unknown adapter method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def adapted_model(base_model: torch.nn.Module, method) -> tuple[torch.nn.Module, dict]:
    """A private copy of the base with `method` attached; only the adapter's parameters require grad.

    A method with `private(base_model) -> tensors` copies only those (what it trains in place, e.g. norm gains) and
    shares every other frozen tensor with the base: a 1.5B base costs 7 GB once, not once per adapted copy.
    A method without it (full fine-tuning) gets a copy of everything."""
    model = method.attach(copy.deepcopy(base_model, memo=_shared(base_model, method)))
    params = method.trainable(model)
    keep = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model, params


def _shared(base_model: torch.nn.Module, method) -> dict:
    """deepcopy memo: the base's tensors the copy may share (frozen, never written by the method)."""
    if not hasattr(method, "private"):
        return {}
    private = {id(t) for t in method.private(base_model)}
    tensors = [*base_model.parameters(), *base_model.buffers()]
    return {id(t): t for t in tensors if id(t) not in private}


def adapter_state(params: dict) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def load_state(params: dict, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy saved tensors into the adapter's parameters, refusing any mismatch in names or shapes."""
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise SharedLLMError(f"{source}: tensor names do not match this method on this base "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise SharedLLMError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))


from . import full, lora, norm, steer  # noqa: E402,F401  (each file registers its method)
