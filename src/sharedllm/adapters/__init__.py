"""The adapter registry: one name per method, one file per method, one small typed contract (`AdapterMethod`).

A method is an object with:
  name                      the registry key, also written into every adapter file
  config                    a frozen dataclass: everything that changes what attach() builds (e.g. LoRA rank,
                            alpha, targets); recorded in every adapter file as `method_config`
  attach(model) -> model    prepare a private copy of the base (may wrap it, e.g. PEFT)
  trainable(model) -> dict  canonical tensor name -> nn.Parameter: exactly what trains and what is saved
  caps                      a `Capabilities`: what else the method can do (per-row serving and fleet training
                            through its kernel in `adapters.rows`, export, value bounds); callers ask it, never
                            the method's name
and a constructor taking its config (`type(method)(config)` builds the method with another config).
Everything else (freezing, saving, loading) is generic and lives here.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import SharedLLMError


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method declares about itself, so that no caller compares method names."""

    rows: Any = None  # its per-row kernel class (adapters.rows): served in mixed batches, fleet-trainable
    export: str | None = None  # "peft": a PEFT folder; "merged": a merged transformers checkpoint; None: neither
    gguf: bool = False  # `sharedllm export --format gguf` can write it into the base's GGUF
    max_value: float = 64.0  # |value| bound the file parser enforces
    periodic_snapshot: bool = True  # training snapshots every few minutes (False: only on SIGTERM; too large)
    frozen_bf16: bool = False  # may train with the base's matmul weights held in bf16 (nothing it trains is one)
    low_rank: bool = False  # its change per site is s B A in PEFT's lora_A / lora_B tensors (compress --rank, --joint)


@runtime_checkable
class AdapterMethod(Protocol):
    name: str
    config: Any  # a frozen dataclass instance
    caps: Capabilities

    def attach(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]: ...


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """The config of a method with nothing to configure (norm, full, steer)."""


METHODS: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    """Add a method (built with its default config) under its name; a name is registered once."""
    if not isinstance(method, AdapterMethod):
        raise SharedLLMError(f"{method!r} is not an adapter method (needs name, config, caps, attach, trainable)")
    if not _is_frozen_dataclass(method.config):
        raise SharedLLMError(f"adapter method {method.name!r}: config must be a frozen dataclass instance")
    if method.name in METHODS:
        raise SharedLLMError(f"adapter method {method.name!r} is already registered (by "
                             f"{type(METHODS[method.name]).__module__}.{type(METHODS[method.name]).__name__}); "
                             "choose another name")
    METHODS[method.name] = method
    return method


def _is_frozen_dataclass(obj) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and obj.__dataclass_params__.frozen


def get_method(name: str, config=None) -> AdapterMethod:
    """The registered method `name`, with its default config or with `config` (its config class, or a JSON dict)."""
    if name not in METHODS:
        raise SharedLLMError(f"unknown adapter method {name!r}; choose from {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    if config is None:
        return method
    if isinstance(config, dict):
        config = config_from_json(name, config)
    if type(config) is not type(method.config):
        raise SharedLLMError(f"adapter method {name!r} takes a {type(method.config).__name__}, "
                             f"not a {type(config).__name__}")
    return method if config == method.config else type(method)(config)


def config_to_json(config) -> dict:
    """A method config as the JSON object recorded in adapter files (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_json(name: str, data, source: str = "adapter") -> Any:
    """Method `name`'s config from its recorded JSON; refuses unknown fields and values of another type than the
    default's (a missing field takes the default: files written before a field existed still load)."""
    default = get_method(name).config
    if not isinstance(data, dict):
        raise SharedLLMError(f"{source}: method_config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SharedLLMError(f"{source}: method_config of {name!r} has unknown field(s) {unknown[:3]}; "
                             f"known: {sorted(fields) or 'none'}")
    values = {k: _typed(k, v, fields[k], source) for k, v in data.items()}
    return dataclasses.replace(default, **values)


def _typed(key: str, value, default, source: str):
    if isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(x, type(d)) for x in value for d in default[:1])
        value = tuple(value) if ok else value
    elif isinstance(default, bool) or isinstance(value, bool):
        ok = type(value) is type(default)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise SharedLLMError(f"{source}: method_config field {key!r} must be like {default!r}, got {str(value)[:40]!r}")
    return value


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` whose parameters and buffers are the very same tensors (no weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def adapted_model(base_model: torch.nn.Module, method) -> tuple[torch.nn.Module, dict]:
    """A private copy of the base with `method` attached; only the adapter's parameters require grad.

    The frozen weights are shared with the base, not copied (a norm adapter's model costs kilobytes, not the
    base's 538 MB); every parameter the method trains is a private clone, so training never touches the base.
    This is the same design as serving (`adapters.rows.RowModel`, also built on `shared_copy`); the one
    difference is where the adapter lives: here each user's model owns it as leaf parameters (autograd and
    the optimizer need them; it is one user's model), the server passes every row's adapter with each call.
    """
    model = method.attach(shared_copy(base_model))
    params = method.trainable(model)
    low = next((n for n, p in params.items() if p.dtype in (torch.bfloat16, torch.float16)), None)
    if low is not None:
        raise SharedLLMError(f"method {method.name} would train {low}, held in {params[low].dtype} by this base "
                             "(--frozen-bf16 holds the matmul weights in bf16): train it on a base held in fp32")
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


from . import full, ia3, lora, loraxs, norm, road, steer, vera  # noqa: E402,F401  (each file registers its method)
