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


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` whose parameters and buffers are the very same tensors (no weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def adapted_model(base_model: torch.nn.Module, method) -> tuple[torch.nn.Module, dict]:
    """A private copy of the base with `method` attached; only the adapter's parameters require grad.

    The frozen weights are shared with the base, not copied (a norm adapter's model costs kilobytes, not the
    base's 538 MB); every parameter the method trains is a private clone, so training never touches the base.
    """
    model = method.attach(shared_copy(base_model))
    params = method.trainable(model)
    frozen = {id(p) for p in base_model.parameters()}
    fresh = {id(p): torch.nn.Parameter(p.detach().clone()) for p in params.values() if id(p) in frozen}
    _swap_parameters(model, fresh)
    params = {name: fresh.get(id(p), p) for name, p in params.items()}
    keep = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model, params


def _swap_parameters(model: torch.nn.Module, fresh: dict) -> None:
    """Replace every parameter whose id is in `fresh` by its clone, in every module (tied weights stay tied)."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) in fresh:
                module._parameters[key] = fresh[id(p)]


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
