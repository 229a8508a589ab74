"""The per-row adapter contract: one forward pass over a batch whose rows each run their own user's adapter.

`RowModel` shares every weight tensor with the frozen base (nothing is copied). It replaces each RMSNorm with a
`RowNorm` and wraps each decoder linear in a `RowLinear`; both read the running call's `RowBatch` from a context
variable that `RowModel.running(batch)` sets, so there is no "active adapter" one request could change under
another (a context variable is local to the calling thread).

A method that can run per row declares a kernel class in its capabilities (`Capabilities.rows`); the kernel

  pack(named, config) -> state      once per adapter (at upload / load), from its decoded named tensors; with
                                    tensors that require grad the state does too (fleet training)
  batch(states) -> view             once per batch composition: `states` has one entry per row, None for rows
                                    of another method (or the bare base)
  gain(view, index) -> [B, D]       (norm sites) the gains of RMSNorm `index` for every row, or None
  linear(view, site, x, y) -> y     (linear sites) y = x @ W.T of decoder linear `site` for every row, plus
                                    this kernel's per-row change (LoRA: + (x A) B; element-wise: * v)

The HF forward (prefill, scoring, training) and the lean decode step (`serve.fastdecode`) call the same two hooks,
so a method is one file: its config, attach/trainable for training alone, and its kernel. `serve/` and `fleet`
see only `RowState`s and `RowBatch`es.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from ..arch import Base, gain_offset, norm_modules
from ..errors import SharedLLMError
from . import METHODS, get_method, shared_copy

_BATCH: contextvars.ContextVar = contextvars.ContextVar("sharedllm_row_batch", default=None)


@dataclass(frozen=True, eq=False)
class RowState:
    """One row's adapter as the per-row forward runs it; `method` None is the bare base. Opaque outside adapters/."""

    method: str | None
    state: object = None
    sha256: str = ""
    nbytes: int = 0
    parts: tuple = ()  # a stacked row (sharedllm.stack): one RowState per kernel it uses, e.g. a group's LoRA + norm

    def part(self, method: str):
        """This row's state for the kernel of `method`, or None."""
        if self.method == method:
            return self.state
        return next((p.state for p in self.parts if p.method == method), None)


def _running() -> "RowBatch":
    batch = _BATCH.get()
    if batch is None:
        raise RuntimeError("a per-row module was called outside RowModel.running (no RowBatch given)")
    return batch


class RowNorm(torch.nn.Module):
    """An RMSNorm without its own weight: row b's gain of norm `index` comes from the running RowBatch.

        out = hidden * rsqrt(mean(hidden^2) + eps) * (gain[row] + offset)     (offset 1 for Gemma's (1 + w))
    """

    def __init__(self, index: int, eps: float, offset: float, name: str):
        super().__init__()
        self.index, self.eps, self.offset, self.name = index, eps, offset, name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gain = _running().gain(self.index)  # [B, D]
        gain = gain.view(gain.shape[0], *([1] * (hidden.dim() - 2)), gain.shape[-1])
        dtype = hidden.dtype
        h = hidden.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (x * (1 + w)).to(dtype)
            return (h * (self.offset + gain.float())).to(dtype)
        return gain * h.to(dtype)  # Llama, Qwen2, Mistral: w * x.to(dtype)


class RowLinear(torch.nn.Module):
    """A frozen decoder linear whose output every per-row kernel may change, row by row."""

    def __init__(self, inner: torch.nn.Linear, site: str):
        super().__init__()
        self.inner, self.site = inner, site

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _running().linear(self.site, x, self.inner(x))


class RowBatch:
    """The per-row views of one batch composition: each kernel's view of its rows' states."""

    def __init__(self, model: "RowModel", rows: list[RowState]):
        self.size = len(rows)
        self.views = {}
        for name, kernel in model.kernels.items():
            states = [r.part(name) for r in rows]
            if name == model.norm_method or any(s is not None for s in states):
                self.views[name] = (kernel, kernel.batch(states))
        self._gain = self.views[model.norm_method]
        self._linear = [(k, v) for name, (k, v) in self.views.items() if name != model.norm_method]

    def gain(self, index: int) -> torch.Tensor:
        kernel, view = self._gain
        return kernel.gain(view, index)

    def touches(self, site: str) -> bool:
        """Whether any row changes linear `site` (the lean step skips the hook when none does)."""
        return any(k.touches(v, site) for k, v in self._linear)

    def linear(self, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for kernel, view in self._linear:
            y = kernel.linear(view, site, x, y)
        return y


class RowModel:
    """The base model, callable on a batch whose rows each carry their own adapter (any per-row method)."""

    norm_method = "norm"  # the kernel that owns the RMSNorm gains (every row has gains: the base's by default)

    def __init__(self, base: Base):
        self.base = base
        self.model = shared_copy(base.model)
        self.device = base.device
        norms = norm_modules(self.model)
        self.norm_names = [f"{n}.weight" for n in norms]  # the norm adapter's canonical tensor names, in order
        self.base_gains = tuple(m.weight.detach().float() for m in norms.values())
        for i, (name, mod) in enumerate(norms.items()):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
            _replace(self.model, name, RowNorm(i, eps, gain_offset(mod), name))
        self.linear_shapes = {}  # site -> (in, out) of every wrapped decoder linear
        for name, mod in list(self.model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                self.linear_shapes[name] = (mod.in_features, mod.out_features)
                _replace(self.model, name, RowLinear(mod, name))
        self.kernels = {name: m.caps.rows(self) for name, m in METHODS.items() if m.caps.rows is not None}
        self.base_row = RowState(None, None, "base", 0)

    def row(self, named: dict[str, torch.Tensor], method: str = "norm", config=None, sha256: str = "") -> RowState:
        """One adapter's decoded tensors (named as its method's trainable() names them) -> its RowState."""
        impl = get_method(method, config)
        if impl.caps.rows is None:
            raise SharedLLMError(f"method {method!r} cannot run per row (it is not served in mixed batches)")
        state = self.kernels[method].pack(named, impl.config)
        return RowState(method, state, sha256, sum(t.numel() * 4 for t in named.values()))

    def stacked(self, parts: list[RowState], sha256: str = "") -> RowState:
        """One row running several per-row parts at once (a group adapter and a user's part on top of it): each part
        goes to its own method's kernel, so they must be of different methods."""
        methods = [p.method for p in parts]
        if None in methods or len(set(methods)) != len(methods):
            raise SharedLLMError(f"a stacked row needs parts of different methods, got {methods}: the group and the "
                                 "user's part on top of it must be of different methods (e.g. a LoRA group, norm on top)")
        return RowState("+".join(methods), None, sha256, sum(p.nbytes for p in parts), tuple(parts))

    def batch(self, rows: list[RowState]) -> RowBatch:
        return rows if isinstance(rows, RowBatch) else RowBatch(self, rows)

    @contextlib.contextmanager
    def running(self, batch: RowBatch):
        """Run the model inside this block with the per-row adapters of `batch`.

        Serving calls it under inference mode; fleet training calls it with states that require grad, so the
        backward pass reaches each user's own tensors."""
        token = _BATCH.set(batch)
        try:
            yield self.model
        finally:
            _BATCH.reset(token)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, rows, **kwargs):
        """One forward pass; `rows` is one RowState per row of `input_ids` (or a RowBatch of them)."""
        with self.running(self.batch(rows)) as model:
            return model(input_ids=input_ids, **kwargs)


def _replace(model: torch.nn.Module, qualified: str, new: torch.nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
